"""Layout-free checkpoints: save at any (tp, pp, dp, ZeRO), resume at any other.

Why our own format rather than DeepSpeed's: DeepSpeed files are per (mp rank, dp rank) and tie a
checkpoint to its layout (changing it needs the offline universal-checkpoint converter), and
Megatron's dist_checkpointing cannot see inside DeepSpeed's ZeRO optimizer. We store, per
canonical parameter name (see sharding.py), each TP shard of the master weight and of the two Adam
moments as flat fragments, each written by the rank that owns it: under ZeRO DeepSpeed's own
partition (ZeRO-1/2: ``param._hp_mapping``; ZeRO-3: the parameter's partition, padding trimmed;
views of its buffers: no gather, no copy on the device), otherwise an even 1/dp of the
stage's replicated states, cut end to end (:func:`replicated_shares`). meta.json's index maps
every (tensor, TP shard) to its fragments, so a reader takes exactly the element range it needs
(safetensors slices are memory-mapped reads):
see :class:`_ShardSource` for a resume (:meth:`CheckpointReader.read_resharded` at another TP
degree; under ZeRO-3 a rank reads and sets only its own partition), :meth:`CheckpointReader.get`
for whole tensors (the HF converter). A checkpoint resumes at any other TP/PP/DP/ZeRO.

Directory ``<output_dir>/checkpoints``::

    step_00000100/
        meta.json                     step, consumed samples, Adam step, layout, recipe, files, index
        tp00_pp00_w000.safetensors    the fragments owned by DP rank 0 of (tp 0, pp 0) ...
        rng/rank00000.pt              RNG states per rank (used when the layout is unchanged)
    latest                            the name of the newest complete checkpoint

The rules that make a checkpoint impossible to lose:

* A checkpoint is written under ``.tmp-step_...`` and renamed to ``step_...`` only after every rank
  has written and synced its files; ``latest`` is then replaced atomically. meta.json records the
  size of every file, so a checkpoint is *complete* when meta.json parses and every file it lists
  has that size (:func:`problem`); anything else is never resumed from.
* The directory ``latest`` names is never deleted or overwritten: a step that is already saved is
  not saved again, rotation never removes it, and a deleted checkpoint is first renamed to
  ``.deleting-step_...`` (so a kill midway cannot leave a ``step_*`` that looks complete).
* If ``latest`` is missing, dangling or names a damaged checkpoint, :func:`find` falls back to the
  newest complete ``step_*`` and says so; a run whose directory holds checkpoints, none complete,
  refuses to start rather than start from step 0 over them.
* Weights that are not finite are never committed as a checkpoint.

The package, one job a module (imports point one way: format <- reader <- states <- save, load;
start uses format):

* :mod:`.format` — the on-disk format: directory names, meta.json (its one writer and readers),
  completeness (:func:`problem`) and which checkpoint to use (:func:`find`);
* :mod:`.reader` — :class:`CheckpointReader`: element ranges of stored tensors, at any TP degree;
* :mod:`.start` — where a run starts (:func:`plan_start`) and what a resume changes;
* :mod:`.states` — the optimizer's view of a parameter: ZeRO partitions, replicated shares, RNG;
* :mod:`.save` — writing, committing and rotating checkpoints, in the background if asked;
* :mod:`.load` — loading a checkpoint into an engine at any layout.
"""
from __future__ import annotations

from ..errors import EXIT_REQUEUE as REQUEUE_EXIT_CODE
from .format import (FORMAT_VERSION, NORM_GAIN_META_KEY, STATE_KINDS, CheckpointError, Found, build_meta,
                     checkpoints_dir, find, index_files, leftovers, norm_gain_scale, problem, read_meta, recipe_of,
                     resolve, step_of)
from .reader import IO_BYTES, CheckpointReader, Part, Shard, report_io
from .start import (SHAPE_KEYS, Start, TrainState, function_mismatch, plan_start, preflight, resume_changes,
                    shape_mismatch)
from .states import ensure_optimizer_states, even_range, relink_optimizer_states, replicated_shares
from .save import PendingSave, clean_partial, discard, rotate, save, save_in_background, wait_for_deletions
from .load import load, load_rng

__all__ = ["REQUEUE_EXIT_CODE", "FORMAT_VERSION", "NORM_GAIN_META_KEY", "STATE_KINDS", "CheckpointError", "Found",
           "build_meta", "checkpoints_dir", "find", "index_files", "leftovers", "norm_gain_scale", "problem",
           "read_meta", "recipe_of", "resolve", "step_of", "IO_BYTES", "CheckpointReader", "Part", "Shard",
           "report_io", "SHAPE_KEYS", "Start", "TrainState", "function_mismatch", "plan_start", "preflight",
           "resume_changes", "shape_mismatch", "ensure_optimizer_states", "even_range", "relink_optimizer_states",
           "replicated_shares", "PendingSave", "clean_partial", "discard", "rotate", "save", "save_in_background",
           "wait_for_deletions", "load", "load_rng"]
