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


def test_every_variant_is_a_valid_config(script, monkeypatch) -> None:
    """A variant's flags on the benchmark's recipe load (a renamed key would fail the GPU run
    only after minutes of compiling the variants before it). The float8 checks see an H100."""
    import torch

    from torchmoe.config.load import load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    bench = script("benchmark")
    recipe = ["--config", "train_configs/deepseek_v3.toml", "--model.n_layers", "4"]
    recipe += ["--parallelism.ep", "1"]
    for name, flags in bench.VARIANTS.items():
        cfg, _ = load_config(recipe + flags + bench._QUIET)
        assert cfg.compile.enable == name.startswith("compiled"), name
