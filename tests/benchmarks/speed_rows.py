"""Synthetic bench_speed worker rows (one worker process prints one per c), for report tests."""


def row(engine: str, c: int, decode: float, prefill: float, **kw) -> dict:
    r = dict(engine=engine, kv_cache_dtype="auto", c=c, ctx=8192, gen=128, prefill_tok_s=prefill,
             decode_tok_s=decode, t1_s=1.0, tgen_s=2.0, pool_bytes=1, cuda_peak_gib=1.5,
             kv_bytes_per_seq=1000.0, async_scheduling=True, model_runner="gpu")
    r.update(kw)
    return r
