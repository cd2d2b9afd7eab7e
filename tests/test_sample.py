import torch

from normlab.lm.config import ModelConfig
from normlab.lm.data import Vocab
from normlab.lm.model import LanguageModel
from normlab.lm.presets import PRESETS
from normlab.lm.sample import generate

VOCAB = Vocab(tuple("abcdefghijklmnopqrstuvwxyz"))


def _trained_deep_model():
    model = LanguageModel(ModelConfig(**PRESETS["lecture-deep"]["model"]), verbose=False)
    X = torch.randint(0, 27, (64, 3))
    model(X)  # one training-mode pass so the running statistics are not the defaults
    return model


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_samples_and_mode_restored():
    model = _trained_deep_model()
    a = generate(model, VOCAB, 50, 20, generator=_gen(1))
    b = generate(model, VOCAB, 50, 20, generator=_gen(1))
    assert a == b and len(a) == 50 and model.training
    assert generate(model, VOCAB, 50, 20, generator=_gen(2)) != a


def test_greedy_one_at_a_time_equals_batched():
    model = _trained_deep_model()
    batched = generate(model, VOCAB, 8, 15, top_k=1, prefix="ma")
    single = generate(model, VOCAB, 1, 15, top_k=1, prefix="ma")
    assert batched == single * 8  # eval-mode BatchNorm: each row independent of the others
    assert single[0].startswith("ma") and len(single[0]) <= 2 + 15


def test_samples_use_only_vocabulary_characters_and_stop_at_max_len():
    model = _trained_deep_model()
    for s in generate(model, VOCAB, 100, 6, temperature=2.0, generator=_gen(0)):
        assert len(s) <= 6 and set(s) <= set(VOCAB.chars)
