"""The node's web side (issue 12): DICOMweb, in a process of its own (``pacs-node web``)."""
