"""The on-flash file format: bundles in placement order in model.rflash, described by
manifest.json. pack writes it (atomically), reader opens and checks it."""
from .bundle import Bundles, BundleSpec, decode_bundles, encode_bundles
from .errors import LayoutChecksumError, LayoutError, LayoutWriteError
from .manifest import LayerRegion, Manifest, read_manifest
from .pack import write_layout
from .reader import (Layout, block_checks, bundle_offset, check_source, describe, open_layout,
                     verify_layout)

__all__ = [
    "BundleSpec", "Bundles", "encode_bundles", "decode_bundles",
    "LayoutError", "LayoutChecksumError", "LayoutWriteError",
    "Manifest", "LayerRegion", "read_manifest",
    "write_layout",
    "Layout", "open_layout", "verify_layout", "check_source", "describe", "bundle_offset",
    "block_checks",
]
