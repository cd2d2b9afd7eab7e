from normlab.lm.propagation import propagate, propagation_table


def test_scaling_decides_what_reaches_the_last_layer():
    last = {v: propagate(v, n_layer=30, batch=500)[-1] for v in ("randn", "gain 1", "kaiming 5/3")}
    assert last["randn"].saturated > 0.5  # unscaled randn: almost every unit saturated
    assert last["gain 1"].std < 0.2  # gain 1 under tanh: the signal fades
    assert 0.5 < last["kaiming 5/3"].std < 0.8 and last["kaiming 5/3"].saturated < 0.15


def test_batchnorm_holds_the_scale_steady():
    stats = propagate("kaiming+BN", n_layer=30, batch=500)
    assert max(s.std for s in stats) - min(s.std for s in stats) < 0.05


def test_table_has_a_row_per_shown_layer():
    table = propagation_table(n_layer=20)
    rows = table.splitlines()[2:]
    assert [int(r.split()[0]) for r in rows] == [1, 2, 3, 5, 10, 20]
