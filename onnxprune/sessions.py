"""The one way this package opens an onnxruntime session: CPU provider (deterministic, present
everywhere), fatal messages only (its errors come back as our one-line messages, and warnings
about unused initializers are noise here), and the wrapper's prints (a provider fallback, say)
sent to stderr: stdout stays clean for --json, and the user still sees them."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path


def cpu_session(model: Path | str | bytes, threads: int = 0):
    """A session on a model file or serialized model bytes; `threads` > 0 fixes the intra-op
    threads and runs the nodes one after the other (what the speed section times)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # sessions timed side by side: an idle pool's threads spinning for work would take the
        # cores from the session that runs (on 2 cores the timings became bimodal, 0.8x-2.2x
        # for the same pair of models)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    with contextlib.redirect_stdout(sys.stderr):
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
