"""What a backend or a plugin command builds on, public and stable: the services the
built-in backends use from the core, so that no package reaches into another's private
modules (a test holds every package of this project to that).

Files (crash-safe writes, see ``docs/safety.rst``):

- :func:`write_atomic`, :func:`check_output_path`, :func:`temp_folder`;
- :func:`staged`, :func:`commit`, :func:`discard`, :func:`file_mode`, :func:`folder_of`,
  :func:`remove_stale_temps`: the pieces :func:`write_atomic` is made of, for a backend
  that writes several files as one (the ONNX backend's external data).

Inputs and statistics:

- :func:`check_real_dtype`, :func:`check_finite`, :func:`is_float_dtype`,
  :func:`non_finite_name`: the refusals every calibration input goes through;
- :func:`load_array`, :func:`load_arrays`, :func:`load_inputs`: ``.npy`` / ``.npz``
  files and folders of images as the command line reads them; :func:`describe_arrays`
  (``x (8, 3, 224, 224) float32``, as the command line prints the inputs it uses);
- :class:`ChannelStats`, :class:`StatsAccumulator`: per-channel statistics of measured
  tensors, which ``Backend.calibration_stats`` returns; :func:`measured_layout`: where
  an IR value's channels lie, as ``StatsAccumulator.add`` takes it.

Rotary embeddings: :func:`rotary_table_misfit` (why a cos / sin table does not fit the
``rotary`` node a backend would make of it).

Layouts: :func:`broadcast_shape` (the shape a per-channel vector takes over a tensor
whose channels are on given axes, for writing back clip bounds or a norm's affine on a
channel-last value), :func:`reshape_axes` (where the channels are after a reshape, the
rule the core follows them by), :class:`LayoutError`, ``LAYOUT_OPS`` (the IR ops that
move channels between axes).

Weights and deployments: :func:`fit_dtype` (an array back in a parameter's dtype, refused
where it overflows), :func:`deployment_of` (a :class:`~cle_core.Deployment` from the
legacy keyword arguments), and :func:`split_inputs`, :func:`measure_pairs` and :func:`mean_db`
(both halves, each calibrating while the other measures), :func:`quality_key`,
:func:`verdict`, :func:`folded_only` (``verify=``: measure the original and the
result, keep the better), :func:`best_draw`, :func:`pick`, :func:`kept_draw`,
:func:`keep_best` (the three in sequence) and :func:`check_draws` (``verify`` with
``draws``: several exact equalizations measured, the best kept),
:func:`check_calibration` (options that need calibration inputs, refused without them).

Commands (``cle_add_commands``): :class:`Progress`, :class:`UsageError` (exit 2 with one
line), :func:`write_plots`, :func:`warn` (one ``cle: warning:`` line on stderr).
"""

from ._backend import check_calibration, warn
from ._cli._common import Progress, UsageError
from ._deployment import deployment_of
from ._files import (
    check_output_path,
    commit,
    discard,
    file_mode,
    folder_of,
    remove_stale_temps,
    staged,
    temp_folder,
    write_atomic,
)
from ._ir import LAYOUT_OPS, rotary_table_misfit
from ._layout import LayoutError, broadcast_shape, reshape_axes
from ._math import fit_dtype
from ._plots import write_plots
from ._quality import (
    check_finite,
    check_real_dtype,
    describe_arrays,
    is_float_dtype,
    load_array,
    load_arrays,
    load_inputs,
    non_finite_name,
)
from ._stats import ChannelStats, StatsAccumulator, measured_layout
from ._verify import (
    best_draw,
    check_draws,
    folded_only,
    keep_best,
    kept_draw,
    mean_db,
    measure_pairs,
    pick,
    quality_key,
    split_inputs,
    verdict,
)

__all__ = [
    "LAYOUT_OPS",
    "ChannelStats",
    "LayoutError",
    "Progress",
    "StatsAccumulator",
    "UsageError",
    "best_draw",
    "broadcast_shape",
    "check_calibration",
    "check_draws",
    "check_finite",
    "check_output_path",
    "check_real_dtype",
    "commit",
    "deployment_of",
    "describe_arrays",
    "discard",
    "file_mode",
    "fit_dtype",
    "folded_only",
    "folder_of",
    "is_float_dtype",
    "keep_best",
    "kept_draw",
    "load_array",
    "load_arrays",
    "load_inputs",
    "mean_db",
    "measure_pairs",
    "measured_layout",
    "non_finite_name",
    "pick",
    "quality_key",
    "reshape_axes",
    "rotary_table_misfit",
    "remove_stale_temps",
    "split_inputs",
    "staged",
    "temp_folder",
    "verdict",
    "warn",
    "write_atomic",
    "write_plots",
]
