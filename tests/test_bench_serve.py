"""benchmarks/serve.py's tables: each cell is compared with dense's cell of
the same budget and the same round, and rounds add their medians."""
import serve as bench


def _cell(method, budget, rnd, tok, conc):
    return dict(method=method, kernel="cpu" if method != "dense" else "sdpa", budget_mib=budget, round=rnd,
                kv_bytes=budget * 2**20, requests=16, max_concurrent=conc, requests_per_s=tok / 100,
                output_tok_per_s=tok,
                ttft_p50=1.0, ttft_p99=2.0, tpot_p50=0.1, tpot_p99=0.2, peak_rss_above_weights_mib=100.0,
                errors=[], wrong_lengths=[], pool_whole=None if method == "dense" else True)


def test_a_cell_is_divided_by_its_own_rounds_dense():
    rows = [_cell("dense", 256.0, 1, 10.0, 2), _cell("gear4", 256.0, 1, 20.0, 8),
            _cell("dense", 256.0, 2, 5.0, 2), _cell("gear4", 256.0, 2, 15.0, 8)]
    table = bench.table(rows)
    assert "| 1 | 256 | gear4 (cpu) | 256.0 | 8 | 4.00 | 0.200 | 20.0 | 2.00 |" in table, table
    assert "| 2 | 256 | gear4 (cpu) | 256.0 | 8 | 4.00 | 0.150 | 15.0 | 3.00 |" in table, table


def test_the_pools_slots_are_shown_beside_its_concurrency():
    """A pool whose every slot is taken is capped by its slots, not its pages: the table says so."""
    rows = [_cell("dense", 256.0, 1, 10.0, 5), _cell("gear4", 256.0, 1, 17.0, 12) | dict(slots=12)]
    assert "| 1 | 256 | gear4 (cpu) | 256.0 | 12 (12) | 2.40 |" in bench.table(rows)


def test_memory_rows_are_divided_by_their_own_rounds_dense():
    rows = [_cell("dense", 0.0, 1, 1.0, 4) | dict(peak_rss_above_weights_mib=800.0),
            _cell("gear4", 0.0, 1, 1.0, 4) | dict(peak_rss_above_weights_mib=200.0),
            _cell("dense", 0.0, 2, 1.0, 4) | dict(peak_rss_above_weights_mib=400.0),
            _cell("gear4", 0.0, 2, 1.0, 4) | dict(peak_rss_above_weights_mib=200.0)]
    for r in rows:
        r["peak_rises_mib"] = {"forward": 1.0}
    table = bench.memory_table(rows)
    assert "| 1 | gear4 | " in table and "| 200 | 0.25 |" in table and "| 200 | 0.50 |" in table, table


def test_the_tokens_preemption_redid_are_shown():
    """Rows that counted them show the prefill tokens preemption repeated; older rows a dash."""
    rows = [_cell("dense", 256.0, 1, 10.0, 5) | dict(redone_tokens=4096), _cell("gear4", 256.0, 1, 17.0, 12)]
    table = bench.table(rows).splitlines()
    assert "| 100 | 4096 | 0/0 | None |" in table[2] and "| 100 | - | 0/0 | True |" in table[3], table
