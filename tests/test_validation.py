"""Bad input gets a clear error naming the argument, before any compute."""
import pytest
import torch

from dpo_fast import linear_logprobs, logits_logprobs

H, V = 8, 20


def _ok():
    return torch.randn(2, 5, H), torch.randn(V, H), torch.randint(0, V, (2, 5)), torch.randn(V)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(weight=torch.randn(V, H + 1)), ValueError, r"weight must have shape \[V, H\] with H = hidden.shape\[-1\] = 8"),
        (lambda a: a.update(labels=torch.randint(0, V, (2, 4))), ValueError, r"labels must have shape \(2, 5\)"),
        (lambda a: a.update(labels=torch.rand(2, 5)), TypeError, "labels must be an integer tensor"),
        (lambda a: a.update(labels=torch.ones(2, 5, dtype=torch.bool)), TypeError, "labels must be an integer tensor"),
        (lambda a: a["labels"].__setitem__((0, 0), V), ValueError, r"labels must hold token ids in \[0, 20\) or ignore_index=-100; found 1 outside, e.g. 20"),
        (lambda a: a["labels"].__setitem__((1, 1), -5), ValueError, r"found 1 outside, e.g. -5"),
        (lambda a: a.update(bias=torch.randn(V - 1)), ValueError, r"bias must have shape \[V\] = \[20\]"),
        (lambda a: a.update(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "dtypes must agree, got hidden: torch.float32, weight: torch.float64"),
        (lambda a: a.update(hidden=torch.randint(0, 3, (2, 5, H))), TypeError, "hidden must be a floating tensor"),
        (lambda a: a.update(weight=torch.randn(V, H)[None]), ValueError, r"weight must have 2 dimension\(s\)"),
        (lambda a: a.update(outputs=("log_probs", "entropyy")), ValueError, r"outputs has unknown names \['entropyy'\]"),
        (lambda a: a.update(softcap=0.0), ValueError, "softcap must be None or a finite number > 0"),
        (lambda a: a.update(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
        (lambda a: a.update(logit_scale=float("inf")), ValueError, "logit_scale must be a finite number > 0"),
        (lambda a: a.update(impl="cuda"), ValueError, "impl must be one of"),
    ],
)
def test_linear_logprobs_bad_input(mutate, exc, match):
    hidden, weight, labels, bias = _ok()
    args = dict(hidden=hidden, weight=weight, labels=labels, bias=bias, impl="torch")
    mutate(args)
    with pytest.raises(exc, match=match):
        linear_logprobs(**args)


def test_labels_equal_to_ignore_index_are_valid_even_if_custom():
    hidden, weight, labels, _ = _ok()
    labels[0, :2] = V + 5
    out = linear_logprobs(hidden, weight, labels, ignore_index=V + 5, impl="torch")
    assert torch.all(out[0, :2] == 0) and torch.all(out[0, 2:] < 0)


def test_devices_must_agree():
    if not torch.cuda.is_available():
        hidden, weight, labels, _ = _ok()
        meta = torch.randn(V, H, device="meta")
        with pytest.raises(ValueError, match="all tensors must be on one device"):
            linear_logprobs(hidden, meta, labels, impl="torch")
    else:  # pragma: no cover
        hidden, weight, labels, _ = _ok()
        with pytest.raises(ValueError, match="all tensors must be on one device"):
            linear_logprobs(hidden, weight.cuda(), labels, impl="torch")


def test_triton_impl_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("CUDA present: triton on CPU tensors is a device mismatch, tested elsewhere")
    hidden, weight, labels, _ = _ok()
    with pytest.raises((ValueError, RuntimeError), match="impl='triton' needs"):
        linear_logprobs(hidden, weight, labels, impl="triton")


def test_logits_logprobs_bad_input():
    logits = torch.randn(2, 5, V)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 5\)"):
        logits_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must hold token ids in \[0, 20\)"):
        logits_logprobs(logits, torch.full((2, 5), V))
    with pytest.raises(TypeError, match="logits must be a floating tensor"):
        logits_logprobs(torch.ones(2, 5, V, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
