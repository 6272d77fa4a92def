"""Reading errors shared by the cine readers (``cmr_io`` and the UK Biobank DICOM route, which
``cmr_io`` calls), kept apart so that neither imports the other back."""


class CMRReadError(ValueError):
    """A cine or mask file could not be read into the contract's shape; the message says why."""
