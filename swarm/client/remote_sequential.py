"""Full-sequence forward and backward through the swarm, as a differentiable torch function.

Servers' weights are frozen: backward returns gradients for the hidden states (and deep
prompts) only, which is what prompt tuning and client-side adapters need.

A server takes a bounded number of tokens (rows x tokens) per request. A forward pass has no cache
to continue from, so a sequence cannot be split, but the rows of a batch can: they go in as many
requests as the limit needs.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Any

import torch
from hivemind.p2p.p2p_daemon_bindings.control import MAX_UNARY_PAYLOAD_SIZE
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from swarm.client.event_loop import run_sync
from swarm.client.routing import MissingBlocksError, RequestRejected, RouteSpan, SequenceManager, rejection
from swarm.names import block_uids, join_chain
from swarm.wire import deserialize, deserialize_streamed, dumps_metadata, pack_args, serialize

logger = logging.getLogger(__name__)

_NO_PROMPTS = torch.empty(0)


async def _call(
    manager: SequenceManager,
    span: RouteSpan,
    method: str,
    tensors: list[torch.Tensor],
    keep_id: str | None = None,
) -> list[torch.Tensor]:
    """One rpc_forward/rpc_backward call, streamed when the payload is large.

    `keep_id`: on a forward, ask the server to keep its graph under this id for the backward
    that will follow; on that backward, name it (the server recomputes if it kept nothing).
    """
    tensors, structure = pack_args(tensors)
    uid = join_chain(block_uids(manager.dht_prefix, span.start, span.end))
    fields = {"args_structure": structure, "active_adapter": manager.config.active_adapter}
    if keep_id is not None:
        fields["keep_for_backward"] = keep_id
    metadata = dumps_metadata(fields)
    serialized = [serialize(t) for t in tensors]
    stub = manager.stub(span.peer_id)
    timeout = manager.config.request_timeout
    if sum(len(t.buffer) for t in serialized) <= MAX_UNARY_PAYLOAD_SIZE // 2:
        response = await getattr(stub, method)(
            runtime_pb2.ExpertRequest(uid=uid, tensors=serialized, metadata=metadata), timeout=timeout
        )
        return deserialize(response.tensors)

    async def parts():
        for tensor in serialized:
            for part in split_for_streaming(tensor, MAX_UNARY_PAYLOAD_SIZE // 2):
                yield runtime_pb2.ExpertRequest(uid=uid, tensors=[part], metadata=metadata)

    chunks = [part async for response in await getattr(stub, f"{method}_stream")(parts()) for part in response.tensors]
    return deserialize_streamed(chunks)


async def _with_retries(
    manager: SequenceManager,
    start: int,
    end: int,
    run,
    sent: torch.Tensor,
    first_route: list[RouteSpan] | None = None,
) -> Any:
    """Run `run(route)` on a route for [start, end) (`first_route` first, if given), rerouting around
    failed servers; `sent`: the hidden states each request carries. A request a server refuses as
    invalid is raised as RequestRejected: the server is not at fault, and others would refuse it too."""
    last_error: Exception | None = None
    for attempt in range(manager.config.max_retries + 1):
        route = first_route if attempt == 0 and first_route else await manager.make_route(start, end, "throughput")
        try:
            return await run(route)
        except MissingBlocksError:
            raise
        except _SpanFailed as e:
            last_error = e.__cause__
            refused = rejection(last_error, sent.shape[0], sent.shape[1])
            if refused is not None:
                if refused.token_limit is not None:  # later requests are split to fit it
                    manager.learn_token_limit(e.span.peer_id, refused.token_limit)
                raise RequestRejected(
                    f"server {e.span.peer_id} refused the request as invalid ({refused.reason})"
                ) from last_error
            logger.warning("Server %s failed (%s); retrying elsewhere", e.span.peer_id, last_error)
            manager.ban(e.span.peer_id)
    raise RuntimeError(f"remote call failed on every server tried; last error: {last_error}")


class _SpanFailed(Exception):
    def __init__(self, span: RouteSpan):
        self.span = span


@dataclasses.dataclass
class TracedSpan:
    """One span a forward pass went through: its input, and the id its server may keep the graph under."""

    span: RouteSpan
    inputs: torch.Tensor
    keep_id: str | None


async def remote_forward(
    manager: SequenceManager,
    hidden: torch.Tensor,
    prompts: torch.Tensor | None,
    start: int,
    end: int,
    keep_for_backward: bool = False,
) -> tuple[torch.Tensor, list[TracedSpan]]:
    """Hidden states after blocks [start, end), plus what each span got (for the backward)."""

    async def run(route: list[RouteSpan]):
        x, trace = hidden, []
        for span in route:
            span_prompts = prompts[span.start : span.end] if prompts is not None else _NO_PROMPTS
            keep_id = uuid.uuid4().hex if keep_for_backward else None
            try:
                (out,) = (await _call(manager, span, "rpc_forward", [x, span_prompts], keep_id))[:1]
            except Exception as e:
                raise _SpanFailed(span) from e
            trace.append(TracedSpan(span, x, keep_id))
            x = out
        return x, trace

    return await _with_retries(manager, start, end, run, hidden)


async def remote_backward(
    manager: SequenceManager,
    trace: list[TracedSpan],
    grad_output: torch.Tensor,
    prompts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    grad_prompts = torch.zeros_like(prompts) if prompts is not None else None
    for traced in reversed(trace):

        async def run(route: list[RouteSpan], span_input=traced.inputs, grad=grad_output, traced=traced):
            # The forward's own server first: it may have kept the graph, sparing a recomputation.
            keep_id = traced.keep_id if route == [traced.span] else None
            # A replacement chain may split the span: recompute its inner inputs first.
            inputs, x = [], span_input
            for sub in route:
                sub_prompts = prompts[sub.start : sub.end] if prompts is not None else _NO_PROMPTS
                inputs.append((sub, x, sub_prompts))
                if sub is not route[-1]:
                    try:
                        x = (await _call(manager, sub, "rpc_forward", [x, sub_prompts]))[0]
                    except Exception as e:
                        raise _SpanFailed(sub) from e
            # Prompt gradients are kept per attempt: a retry after a later server failed must not
            # count the spans that had already answered twice.
            span_grad_prompts = []
            for sub, x, sub_prompts in reversed(inputs):
                try:
                    grads = await _call(manager, sub, "rpc_backward", [x, grad, sub_prompts], keep_id)
                except Exception as e:
                    raise _SpanFailed(sub) from e
                grad = grads[0]
                if len(grads) > 1:
                    span_grad_prompts.append((sub, grads[1]))
            return grad, span_grad_prompts

        span = traced.span
        grad_output, span_grad_prompts = await _with_retries(manager, span.start, span.end, run, traced.inputs, [span])
        if grad_prompts is not None:
            for sub, grad in span_grad_prompts:
                grad_prompts[sub.start : sub.end] += grad.to(grad_prompts.dtype)
    return grad_output, grad_prompts


class _RemoteSequentialFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, prompts: torch.Tensor, manager: SequenceManager, timeout: float, training: bool
    ):
        has_prompts = prompts.numel() > 0
        output, trace = run_sync(
            remote_forward(
                manager,
                hidden.detach().cpu(),
                prompts.detach().cpu() if has_prompts else None,
                0,
                manager.num_blocks,
                keep_for_backward=training,
            ),
            timeout,
        )
        ctx.manager, ctx.trace, ctx.timeout = manager, trace, timeout
        ctx.prompts = prompts.detach().cpu() if has_prompts else None
        ctx.devices = (hidden.device, hidden.dtype)
        return output.to(hidden.device, hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_prompts = run_sync(
            remote_backward(ctx.manager, ctx.trace, grad_output.detach().cpu(), ctx.prompts), ctx.timeout
        )
        device, dtype = ctx.devices
        grad_prompts = grad_prompts.to(device) if grad_prompts is not None else None
        return grad_hidden.to(device, dtype), grad_prompts, None, None, None


def remote_sequential(
    manager: SequenceManager, hidden: torch.Tensor, prompts: torch.Tensor | None = None
) -> torch.Tensor:
    """Differentiable: hidden states after all of the model's remote blocks."""
    timeout = manager.config.request_timeout * (manager.config.max_retries + 2) * 4 + 60
    prompts = prompts if prompts is not None else torch.empty(0, device=hidden.device)
    training = torch.is_grad_enabled() and (hidden.requires_grad or prompts.requires_grad)
    rows = _rows_per_request(manager, hidden.shape[1])
    if hidden.shape[0] <= rows:
        return _RemoteSequentialFunction.apply(hidden, prompts, manager, timeout, training)
    # Rows are independent: each group is a forward (and later a backward) of its own; autograd joins them.
    groups = hidden.split(rows)
    group_prompts = prompts.split(rows, dim=1) if prompts.numel() > 0 else [prompts] * len(groups)
    outputs = [
        _RemoteSequentialFunction.apply(group, group_prompt, manager, timeout, training)
        for group, group_prompt in zip(groups, group_prompts)
    ]
    return torch.cat(outputs)


def _rows_per_request(manager: SequenceManager, tokens: int) -> int:
    """How many rows of `tokens` tokens fit in one request to any server known so far."""
    limit = manager.min_tokens_per_request()
    if tokens > limit:
        raise RequestRejected(
            f"a sequence of {tokens} tokens is longer than the servers take in one request ({limit}); a forward "
            "pass cannot be split along the sequence (an inference session can: it keeps a cache)"
        )
    return max(limit // max(tokens, 1), 1)
