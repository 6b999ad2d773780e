"""Reading a decoder's layers: every hidden state from one forward pass, and the readout that turns any of them into
the model's logits (the logit lens).

Each exit l reads ``Readout(h_l)`` = softcap(head(final_norm(h_l))), with h_L taken before the final norm, so that exit
L is the model's own output in every family (hsconv.architectures says where each family keeps its final norm, gain
offset and softcap). :func:`decoder_states` runs the decoder once for all L+1 states, without the LM head, so that no
vocabulary-sized logits exist until an exit asks for them; :meth:`Readout.score_targets` then scores targets with the
head read in vocabulary blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsconv.architectures import family_of_config
from hsconv.errors import InputError


def final_norm_module(model: torch.nn.Module) -> torch.nn.Module:
    """The final normalisation applied before the LM head (where it lives is the family's, see hsconv.architectures)."""
    family = family_of_config(model.config)
    decoder = model.get_decoder()
    norm = getattr(decoder, family.final_norm, None)
    if not isinstance(norm, torch.nn.Module):
        raise InputError(f"cannot find the final norm of {type(model).__name__} (no module "
                         f"{type(decoder).__name__}.{family.final_norm}, where the {family.name} family keeps it)")
    return norm


def cap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma's output softcap ``c·tanh(z/c)``; the identity where the family has none."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


@dataclass
class Readout:
    """What turns a pre-norm state into the model's logits: the final norm, the LM head, then the family's softcap.
    Every exit of the logit lens goes through it, so exit L equals the model's own logits in every family."""
    final_norm: torch.nn.Module
    head: torch.nn.Module
    softcap: float | None = None

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits from a state the final norm has already been applied to."""
        return cap_logits(self.head(normed), self.softcap)

    def __call__(self, pre_norm: torch.Tensor) -> torch.Tensor:
        return self.logits(self.final_norm(pre_norm))

    def score_targets(self, pre_norm: torch.Tensor, targets: torch.Tensor, vocab_block: int = 2048,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(target) under the logits of each row, and the row's argmax token, without writing the rows ×
        vocabulary logits: the head's vocabulary is read in blocks of ``vocab_block`` rows, each block's logits are
        scored while they are still in cache, and log Σ exp(z) is carried across blocks as a running maximum and a
        rescaled sum (the online logsumexp). Writing and rereading the whole V-sized logits from memory cost as much
        as the head product itself on a CPU (BENCHMARKS.md). ``dtype``: the precision of the softmax (lm-eval's
        ``softmax_dtype``). The argmax is the first maximal token, as ``torch.max`` gives it."""
        normed = self.final_norm(pre_norm)
        weight, bias = getattr(self.head, "weight", None), getattr(self.head, "bias", None)
        if not isinstance(self.head, torch.nn.Linear):  # another head: score its full logits
            logits = self.logits(normed).to(dtype)
            normaliser = torch.logsumexp(logits, dim=-1)
            return logits.gather(1, targets[:, None]).squeeze(1) - normaliser, logits.argmax(dim=-1)
        rows, vocab = normed.shape[0], weight.shape[0]
        top = torch.full((rows,), -torch.inf, dtype=dtype, device=normed.device)
        total = torch.zeros(rows, dtype=dtype, device=normed.device)
        top_token = torch.zeros(rows, dtype=torch.long, device=normed.device)
        target_logit = torch.empty(rows, dtype=dtype, device=normed.device)
        storage = torch.empty(rows * min(vocab_block, vocab), dtype=normed.dtype, device=normed.device)
        for low in range(0, vocab, vocab_block):
            high = min(low + vocab_block, vocab)
            block = storage[:rows * (high - low)].view(rows, high - low)  # contiguous, as mm's out= wants
            if bias is None:
                torch.mm(normed, weight[low:high].T, out=block)
            else:
                torch.addmm(bias[low:high], normed, weight[low:high].T, out=block)
            if self.softcap is not None:  # cap_logits, in place
                block.div_(self.softcap).tanh_().mul_(self.softcap)
            block = block.to(dtype)
            inside = ((targets >= low) & (targets < high)).nonzero().squeeze(1)
            target_logit[inside] = block[inside, targets[inside] - low]
            block_top, block_token = block.max(dim=1)
            top_token = torch.where(block_top > top, block_token + low, top_token)  # strict: the first maximum
            new_top = torch.maximum(top, block_top)
            total = total * (top - new_top).exp() + block.sub_(new_top[:, None]).exp_().sum(dim=1)
            top = new_top
        return target_logit - (top + total.log()), top_token


def readout(model: torch.nn.Module) -> Readout:
    family = family_of_config(model.config)
    head = model.get_output_embeddings()
    if head is None:
        raise InputError(f"{type(model).__name__} has no output embeddings (LM head) to read layers through")
    softcap = getattr(model.config, family.softcap, None) if family.softcap else None
    return Readout(final_norm_module(model), head, float(softcap) if softcap else None)


def fold_final_norm_gain(model: torch.nn.Module) -> dict:
    """Move the final norm's gain g (and a LayerNorm's bias b) into the LM head: the norm keeps only its
    normalisation (gain 1, bias b/g) and the head becomes W·diag(g), untied from the embeddings where it was tied.

    Every exit's logits stay the same, since each reads head(norm(h)) = W (g ⊙ x̂ + b); only the hf convention's
    h_L changes: with an RMSNorm it becomes a positive multiple of the pre-norm h_L, so D_L(hf) = D_L(pre_norm).
    A reparametrisation, not a change of the model's function; returns what was done, for the manifest."""
    family = family_of_config(model.config)
    norm, head = final_norm_module(model), model.get_output_embeddings()
    with torch.no_grad():
        gain = norm.weight.detach().double() + family.norm_gain_offset
        if (gain == 0).any():
            raise InputError(f"the final norm of {type(model).__name__} has a zero gain in "
                             f"{int((gain == 0).sum())} dimension(s); folding would divide its bias by zero")
        tied = head.weight is model.get_input_embeddings().weight
        if tied:
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False
        head.weight.mul_(gain.to(head.weight.dtype))
        norm.weight.fill_(1.0 - family.norm_gain_offset)
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(gain.to(norm.bias.dtype))
    largest = int(gain.abs().argmax())
    return {"folded": "final norm gain into the LM head", "untied_head": tied, "dimensions": int(gain.numel()),
            "largest_gain": {"dimension": largest, "value": float(gain[largest])},
            "negative_gains": int((gain < 0).sum())}


@torch.no_grad()
def layer_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """:func:`decoder_states` without autograd, for measurement."""
    return decoder_states(model, input_ids, attention_mask)


def decoder_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """All L+1 hidden states from one forward pass of the decoder (no LM head, so no vocabulary-sized logits).

    Returns ``states`` (h_0..h_{L−1}, then h_L with the final norm applied, as HF returns it) and ``pre_norm_last``
    (h_L before the final norm), captured by a hook on the final norm's input. Differentiable (the trainer's path).
    """
    captured = {}
    hook = final_norm_module(model).register_forward_hook(
        lambda module, inputs, output: captured.update(pre_norm=inputs[0], normed=output))
    try:
        outputs = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                      output_hidden_states=True, use_cache=False)
    finally:
        hook.remove()
    states = list(outputs.hidden_states)
    # Whatever the transformers version put last, define `hf` as "final norm applied" explicitly.
    states[-1] = captured["normed"]
    return {"states": states, "pre_norm_last": captured["pre_norm"]}


def lens_states(result: dict) -> list[torch.Tensor]:
    """The states the logit lens reads: h_0..h_{L−1} and the pre-norm h_L (the lens applies the final norm once)."""
    return result["states"][:-1] + [result["pre_norm_last"]]
