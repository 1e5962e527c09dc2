"""benchmarks/generate_memory.py: the warm-up makes the calls of the run it
precedes, down to the decode ids' strides, so the graphs a chunked run needs
are compiled before the peak is reset."""
import torch

import generate_memory as bench


def test_the_warm_up_is_the_runs_own_calls_in_order():
    ids = torch.arange(100)[None]
    pieces = bench.warm_up_pieces(ids, 8)
    assert [p.shape[1] for p in pieces] == [8, 8, 8, 1, 1]      # a first chunk, two later, two steps
    assert torch.equal(torch.cat(pieces, 1), ids[:, :26])       # consecutive: each call extends the last
    run_step = torch.randn(1, 1, 50).argmax(-1)                # the run's next ids: argmax of the last logits
    assert all(p.stride() == run_step.stride() for p in pieces[3:])    # else the step's graph guards fail


def test_rises_count_from_start_after_a_warm_up():
    """The rises a warm-up made (its compiles) are not charged to the run that follows."""
    from peak_memory import PeakPhases
    phases = PeakPhases("outside")
    phases.run("warm-up compile", lambda: bytearray(64 << 20))     # may or may not raise the peak
    phases.gain["warm-up compile"] = 1 << 20                        # as if it had
    phases.start()
    assert "warm-up compile" not in phases.mib()

