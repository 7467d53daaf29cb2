"""benchmark.py: the idle-gap finder (where the GPU waited between kernels, overlaps merged) and
the variant names."""


def test_gaps_merge_overlapping_kernels_and_rank_the_longest(script) -> None:
    bench = script("benchmark")
    kernels = [  # out of order, one kernel inside another's span, one overlapping its end
        (40.0, 45.0, "d"),
        (0.0, 10.0, "a"),
        (2.0, 5.0, "inside a"),
        (8.0, 12.0, "b"),
        (30.0, 31.0, "c"),
    ]
    total, gaps = bench.gpu_idle_gaps(kernels, top=1)
    assert total == (30 - 12) + (40 - 31)
    assert gaps == [(18.0, "b", "c")]
    assert bench.gpu_idle_gaps([], top=3) == (0.0, [])


def test_the_default_variants_list_splits_back_into_the_variant_names(script) -> None:
    bench = script("benchmark")  # --variants defaults to the names joined by commas
    assert ",".join(bench.VARIANTS).split(",") == list(bench.VARIANTS)
