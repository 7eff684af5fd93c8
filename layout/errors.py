"""What can be wrong with a layout on disk. Bad arguments to the writer are ValueError;
these are for files that exist but cannot be trusted."""


class LayoutError(Exception):
    """A layout (model.rflash + manifest.json) that is missing, damaged, or belongs to
    something else; the message names the file and what to do."""


class LayoutChecksumError(LayoutError):
    """A region whose bytes no longer match the checksum recorded when it was packed.

    `regions` lists (layer, offset) of every failing region, first one first."""

    def __init__(self, message: str, regions: list[tuple[int, int]] | None = None):
        super().__init__(message)
        self.regions = regions or []


class LayoutWriteError(LayoutError, OSError):
    """Writing a layout failed (no space left, a file size limit, an I/O error); the files
    under the final names are what they were before. An OSError too, so callers that catch
    the system error still do."""
