"""Serving batches over the paged cache: requests from prompts (some continuing a cached prefix), prefilled as one
packed stream by ``schedule.forward``, then decoded greedily from their pages.

    cache = model.setup_paged_caches(num_blocks, max_seq_len, block_size=16)
    shared = cache_prefix(model, cache, system_prompt, comm)     # optional: K/V that requests share
    tokens, batch = add_prompts(cache, prompts, prefixes=[(shared, len(system_prompt))] * len(prompts))
    logits = schedule.forward(model, tokens, comm, ChunkSplit.even(batch.total), start=batch)
    schedule.settle(comm)                                        # every rank, after its forwards
    per_request = batch.unpack(logits[0])                        # [(len(prompts[i]), vocab), ...]
    next_tokens = torch.stack([x[-1] for x in per_request]).argmax(-1)
    fed, step_logits = greedy_decode(model, next_tokens, steps, comm, cache=cache, requests=batch.requests)
"""

import torch

from . import schedule


def add_prompts(cache, prompts, prefixes=None):
    """New requests of ``cache`` (a ``PagedCache``) for ``prompts``, 1-D token tensors: each request's tokens
    to compute. ``prefixes[i]``, a (request, length) pair or None, makes request i begin with the first
    ``length`` cached tokens of that earlier request, so only ``prompts[i]`` follows them.

    Returns (tokens (1, total) on the cache's device, the ``PackedBatch`` of those tokens) for the model or
    ``schedule.forward``.
    """
    prefixes = prefixes if prefixes is not None else [None] * len(prompts)
    requests = []
    for prefix in prefixes:
        prefix_of, prefix_len = prefix if prefix is not None else (None, 0)
        requests.append(cache.add_request(prefix_of=prefix_of, prefix_len=prefix_len))
    batch = cache.append(requests, [len(prompt) for prompt in prompts])
    return torch.cat(list(prompts))[None].to(batch.device), batch


def cache_prefix(model, cache, prefix, comm=None):
    """Prefill ``prefix`` (1-D tokens) as a request of its own, unsplit and serial; returns that request, whose
    pages later requests share through ``add_prompts(..., prefixes=[(request, len(prefix)), ...])``."""
    tokens, batch = add_prompts(cache, [prefix])
    schedule.forward(model, tokens, comm, start=batch, schedule="serial", all_logits=False)
    schedule.settle(comm)
    return batch.requests[0]


def greedy_decode(model, first, steps, comm=None, *, position=None, cache=None, requests=None):
    """Greedy decode, one token per sequence per step: feed ``first`` (sequences,) (the argmax of their
    prefill's last logits), then each step's argmax, ``steps`` steps in all. The sequences are the rows of
    the model's contiguous caches, continuing at ``position``, or the ``requests`` of the paged ``cache``.

    Returns (the tokens fed (sequences, steps), their fp32 logits (sequences, steps, vocab)); the argmax of the
    last step's logits is the token after them.
    """
    if (position is None) == (cache is None):
        raise ValueError("pass position (contiguous caches) or cache and requests (paged), not both")
    if steps == 0:
        return first.new_empty(len(first), 0), torch.empty(len(first), 0, model.args.vocab_size)
    fed, logits = [], []
    token = first
    for _ in range(steps):
        if cache is not None:  # every request's next token, packed into one stream
            tokens, start = token[None], cache.append(requests, [1] * len(requests))
        else:
            tokens, start, position = token[:, None], position, position + 1
        step = schedule.forward(model, tokens, comm, start=start, schedule="serial", all_logits=False)
        fed.append(token)
        logits.append(step)
        token = step.argmax(-1)
    schedule.settle(comm)
    return torch.stack(fed, dim=1), torch.stack(logits, dim=1)
