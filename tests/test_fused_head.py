"""fused_head_logprobs: the fused head run inside the model's own forward (single process).

The multi-rank behaviour (FSDP2, DDP, DeepSpeed) is in tests/test_distributed.py.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from dpo_fast.integrations.hf import check_lm_head_spec, completion_logps, fused_head_logprobs  # noqa: E402
from dpo_fast.reference import reference_logits_logprobs  # noqa: E402

from ._models import build_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
V = 64


def _model():
    return build_llama(V, seed=3).train()


def _ids(B=3, T=9, seed=0):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_index_rows_and_extra_model_kwargs_match_the_logits():
    model = _model()
    ids = _ids()
    position_ids = torch.arange(ids.shape[1]).expand_as(ids) + 2   # an extra forward kwarg, honoured
    index = torch.tensor([0, 5, 9, 13, 26, 20])                     # flat rows of [B*T]
    labels = torch.tensor([4, 7, 11, 3, 60, -100])
    got, out = fused_head_logprobs(model, labels, index=index, input_ids=ids, position_ids=position_ids)
    logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits.reshape(-1, V)
    expected = reference_logits_logprobs(logits[index], labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert out.logits.shape == (6, 1)  # the model post-processed the small fused tensor, not [B, T, V] logits
    weights = torch.randn(6)
    (got * weights).sum().backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (expected * weights).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_head_forward_is_restored_even_after_an_error():
    model = _model()
    ids = _ids()
    assert "forward" not in model.lm_head.__dict__
    with pytest.raises(ValueError, match="do not match labels"):
        fused_head_logprobs(model, torch.zeros(2, 2, dtype=torch.long), input_ids=ids)
    assert "forward" not in model.lm_head.__dict__ and not model.lm_head._forward_hooks
    plain = model(input_ids=ids).logits
    assert plain.shape == (3, 9, V)


def test_model_that_never_calls_its_lm_head_is_a_clear_error():
    class Bypass(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            hidden = self.model(input_ids=input_ids).last_hidden_state
            return transformers.modeling_outputs.CausalLMOutput(logits=hidden @ self.lm_head.weight.T)

    model = Bypass(build_llama(V).config)
    ids = _ids()
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match="never called its output embedding"):
        completion_logps(model, ids, mask, mask)


def test_check_lm_head_spec_catches_a_head_that_is_not_its_linear():
    model = _model().eval()

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    head = Scaled(model.config.hidden_size, V, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    with pytest.raises(ValueError, match="computes its logits differently"):
        check_lm_head_spec(model)


def test_wrapped_model_is_unwrapped_for_the_head_but_called_through_the_wrapper():
    class Wrapper(torch.nn.Module):  # the shape of DistributedDataParallel / a DeepSpeed engine
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    model = _model()
    wrapped = Wrapper(model)
    ids = _ids()
    mask = torch.ones_like(ids)
    got = completion_logps(wrapped, ids, mask, mask)
    assert wrapped.calls == 1
    torch.testing.assert_close(got, completion_logps(model, ids, mask, mask), rtol=0, atol=0)


def test_bad_index_is_named():
    model = _model()
    ids = _ids()
    with pytest.raises(TypeError, match="index"):
        fused_head_logprobs(model, torch.tensor([1]), index=torch.tensor([0.0]), input_ids=ids)
    with pytest.raises(ValueError, match="index"):
        fused_head_logprobs(model, torch.tensor([1]), index=torch.tensor([99]), input_ids=ids)
    with pytest.raises(ValueError, match="shape of index"):
        fused_head_logprobs(model, torch.tensor([1, 2]), index=torch.tensor([0]), input_ids=ids)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"labels must hold token ids in \[0, 64\)"):
        fused_head_logprobs(model, torch.tensor([64]), index=torch.tensor([0]), input_ids=ids)
    assert not calls, "a bad label must be refused before the model runs"


def test_saves_the_heads_own_weight_and_no_full_size_copy():
    # What FSDP2/ZeRO-3 keep unsharded for the backward is the head's own weight; the fused op
    # must save that tensor itself and nothing of its size (no gathered or cast copy).
    model = _model()
    ids = _ids()
    mask = torch.ones_like(ids)
    weight = model.lm_head.weight
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = completion_logps(model, ids, mask, mask, impl="torch")
    params = {p.data_ptr() for p in model.parameters()}
    assert any(t.data_ptr() == weight.data_ptr() for t in saved)
    copies = [t for t in saved if t.numel() >= weight.numel() and t.data_ptr() not in params]
    assert not copies, [(tuple(t.shape), t.dtype) for t in copies]
    got.sum().backward()
    assert weight.grad is not None and weight.grad.dtype == weight.dtype


def test_standard_trainer_refuses_a_deepspeed_engine():
    from dpo_fast.trainer import StandardTrainer

    engine = type("DeepSpeedEngine", (torch.nn.Module,), {})()
    engine.module = _model()
    with pytest.raises(ValueError, match="DeepSpeed engine"):
        StandardTrainer(engine, [object()], pad_token_id=0)
