"""pacs-node: a DICOM node that classifies chest X-ray and CT studies.

Every result it produces is AI-generated, for research use, and not for diagnostic use.
"""

__version__ = "0.3.0"
