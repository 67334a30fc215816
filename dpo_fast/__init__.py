"""dpo_fast: fused kernels for the hot path of DPO training."""
from .ops import LinearLogprobs, linear_logprobs, logits_logprobs, sequence_logps
from .options import LogprobOptions

__version__ = "0.1.0"
from .losses import LOSS_TYPES, DPOOutput, FusedLinearDPOLoss, dpo_loss, fused_linear_dpo_loss
from .vocab_parallel import VocabParallelLinearLogprobs, VocabShard, vocab_parallel_linear_logprobs
