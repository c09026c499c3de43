"""The models: header rules, DICOM to tensors, runtimes, Grad-CAM, result objects, training.

Every result it produces is AI-generated, for research use, and not for diagnostic use.
"""

DISCLAIMER = "AI-generated, not for diagnostic use"
