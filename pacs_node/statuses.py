"""Named DIMSE status codes (PS3.4 Annex B, C and PS3.7 Annex C); no bare hex in handlers."""

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # optional keys not supported
CANCEL = 0xFE00

# C-STORE failures (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# C-STORE warnings
COERCION_OF_DATA_ELEMENTS = 0xB000

# C-FIND failures (PS3.4 C.4.1.1.4)
FIND_OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
# C-GET and C-MOVE failures (PS3.4 C.4.2.1.5, C.4.3.1.4)
OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702  # unable to perform sub-operations
UNABLE_TO_PROCESS = 0xC000

# General (PS3.7 C.5)
PROCESSING_FAILURE = 0x0110
NOT_AUTHORIZED = 0x0124
SOP_CLASS_NOT_SUPPORTED = 0x0122
NO_SUCH_SOP_CLASS = 0x0118
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115


def is_success(status: int) -> bool:
    return status == SUCCESS


def is_warning(status: int) -> bool:
    return status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


def is_failure(status: int) -> bool:
    return not (is_success(status) or is_warning(status) or status in (PENDING, PENDING_WARNING))
