"""The errors a user can act on: the CLI prints their message as one line and exits 2.
Anything else is a bug and keeps its traceback."""
from ..compile.errors import ToolchainError
from ..layout.errors import LayoutError
from ..runtime_py.reader import ReadError
from ..tuning.calibration import CalibrationError
from ..tuning.model import ModelLoadError
from ..tuning.placement import PlacementError
from ..tuning.predictor import PredictorError
from ..tuning.profile import ProfileError
from ..tuning.sparsify import SparsifyError
from .bench_placement import PlacementBenchError
from .probe import ProbeError
from .rpc import RemoteError

# ValueError covers bad arguments caught below the parser (shapes, placements, sparsity).
USER_ERRORS = (LayoutError, ReadError, CalibrationError, ModelLoadError, ProfileError, PredictorError,
               PlacementError, PlacementBenchError, ToolchainError, ProbeError, ValueError,
               FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError,
               PermissionError, RemoteError, SparsifyError)
