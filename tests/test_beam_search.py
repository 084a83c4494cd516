"""Beam search through the swarm equals local transformers beam search on the demo model, token for token.

Between steps beam search reorders the batch; the reorder travels with the next step as hypo_ids
and every server reorders its cache rows before computing that step. The client's replay history
and token ids follow the same reorders.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModelForCausalLM
from swarm.client import model as model_module
from swarm.client.inference_session import InferenceSession, replay_history
from swarm.client.model import _align_session
from tests.conftest import DEMO_MODEL, start_swarm

# Prompts whose best beam moves between rows (checked below), so a cache that ignored the
# reorders would give other tokens.
PROMPT = "Assignment statements are used to"
BATCH = ["The function returns the value of", "The for statement is used to"]  # the same number of tokens
BEAMS = dict(num_beams=3, do_sample=False)  # the demo model's generation config samples by default


# ----- the bookkeeping, without a swarm -----


def test_replay_history_follows_every_reorder():
    generator = torch.Generator().manual_seed(0)
    steps, naive = [], None
    for length, hypo_ids in [(4, None), (1, [2, 0, 0]), (1, None), (2, [1, 2, 1]), (1, [0, 0, 2])]:
        hidden = torch.randn(3, length, 5, generator=generator)
        rows = torch.tensor(hypo_ids) if hypo_ids is not None else None
        steps.append((hidden, rows))
        # What a server's cache goes through: reorder the rows it holds, then append the step.
        kept = naive if rows is None or naive is None else naive[rows]
        naive = hidden if kept is None else torch.cat([kept, hidden], dim=1)
        assert torch.equal(replay_history(steps), naive)
    assert replay_history([]) is None


def test_session_reorders_token_ids_at_once_and_composes_pending_hypo_ids():
    session = InferenceSession(manager=None, max_length=16)
    session.token_ids = torch.tensor([[1, 10], [2, 20], [3, 30]])
    session.position = 2
    session.reorder(torch.tensor([2, 2, 0]))
    session.reorder([1, 0, 0])  # before any step: row i now continues old row [2, 2, 0][[1, 0, 0][i]]
    assert session.token_ids.tolist() == [[3, 30], [3, 30], [3, 30]]
    assert session._hypo_ids.tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="row indices"):
        session.reorder([0, 3, 1])
    with pytest.raises(ValueError, match="row indices"):
        session.reorder([0, 1])


def test_align_session_keeps_the_held_rows_or_matches_them():
    session = InferenceSession(manager=None, max_length=16)
    session.token_ids = torch.tensor([[5, 6, 7], [5, 6, 8], [5, 9, 9]])
    session.position = 3

    # Beam search as usual: each row extends the row held in its place; only the last token is new.
    _align_session(session, torch.tensor([[5, 6, 7, 1], [5, 6, 8, 2], [5, 9, 9, 3]]))
    assert session.position == 3 and session._hypo_ids is None

    # A new call (a conversation going on from one beam): every row continues held row 1.
    _align_session(session, torch.tensor([[5, 6, 8, 4, 4]] * 3))
    assert session.position == 3
    assert session._hypo_ids.tolist() == [1, 1, 1]
    assert session.token_ids.tolist() == [[5, 6, 8]] * 3

    # Rows that share only a prefix with anything held: rewind to what all of them can keep.
    session = InferenceSession(manager=None, max_length=16)
    session.token_ids = torch.tensor([[5, 6, 7], [5, 6, 8]])
    session.position = 3
    _align_session(session, torch.tensor([[5, 6, 8, 1], [5, 4, 4, 4]]))
    assert session.position == 1 and session.token_ids.tolist() == [[5], [5]]


# ----- a real swarm -----


@pytest.fixture(scope="module")
def local_model():
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = start_swarm(make_swarm, "0:4", "4:8")
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def model(swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers)
    yield model
    model.close()


def _beams_moved(local_model, inputs, **options) -> bool:
    """Whether some returned sequence came from different beam rows over the steps."""
    out = local_model.generate(inputs, **{**options, "return_dict_in_generate": True, "output_logits": True})
    return any(len(set(row[row >= 0].tolist())) > 1 for row in out.beam_indices)


@pytest.mark.integration
def test_beam_search_matches_local(model, local_model, tokenizer, monkeypatch):
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    options = dict(max_new_tokens=16, return_dict_in_generate=True, output_scores=True, **BEAMS)
    expected = local_model.generate(inputs, **options)
    greedy = local_model.generate(inputs, max_new_tokens=16, do_sample=False)
    assert expected.sequences.tolist() != greedy.tolist() and _beams_moved(local_model, inputs, **options)

    # Spies: before each step the session's rows already follow transformers' beams (its
    # _reorder_cache reached the session, no row matching was needed), and the servers got hypo_ids.
    rows_in_place, sent_hypo_ids = [], []

    def align(session, input_ids):
        if session.token_ids is not None:  # (after the first step)
            held = min(session.position, input_ids.shape[1] - 1)
            rows_in_place.append(torch.equal(session.token_ids[:, :held], input_ids[:, :held]))
        _align_session(session, input_ids)

    monkeypatch.setattr(model_module, "_align_session", align)
    with model.inference_session(max_length=inputs.shape[1] + 16) as session:
        step = session._step
        session._step = lambda hidden, start, hypo_ids, prompts: (
            sent_hypo_ids.append(hypo_ids) or step(hidden, start, hypo_ids, prompts)
        )
        actual = model.generate(inputs, session=session, **options)
        assert session.tokens_sent == session.position  # reordered in place: no token was sent twice
    assert actual.sequences.tolist() == expected.sequences.tolist()
    torch.testing.assert_close(actual.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=0)
    assert len(rows_in_place) > 1 and all(rows_in_place)
    assert any(hypo_ids is not None for hypo_ids in sent_hypo_ids)


@pytest.mark.integration
def test_batched_beam_search_returning_several_sequences_matches_local(model, local_model, tokenizer):
    inputs = tokenizer(BATCH, return_tensors="pt").input_ids
    options = dict(max_new_tokens=12, num_return_sequences=2, length_penalty=0.5, **BEAMS)
    assert _beams_moved(local_model, inputs, **options)
    expected = local_model.generate(inputs, **options)
    actual = model.generate(inputs, **options)
    assert actual.shape[0] == 4
    assert actual.tolist() == expected.tolist()


@pytest.mark.integration
def test_beam_search_conversation_reuses_the_best_beam(model, local_model, tokenizer):
    first = tokenizer(PROMPT, return_tensors="pt").input_ids
    with model.inference_session(max_length=96) as session:
        reply = model.generate(first, max_new_tokens=8, session=session, **BEAMS)
        sent = session.tokens_sent
        follow_up = tokenizer(" and the list", return_tensors="pt", add_special_tokens=False).input_ids
        conversation = torch.cat([reply, follow_up], dim=1)
        second = model.generate(conversation, max_new_tokens=8, session=session, **BEAMS)
        # The servers continue from the beam that became the reply: only its last token (never
        # sent), the follow-up and the new tokens cross the network.
        assert session.tokens_sent - sent <= 1 + follow_up.shape[1] + 8 - 1
    expected = local_model.generate(conversation, max_new_tokens=8, **BEAMS)
    assert second.tolist() == expected.tolist()


@pytest.mark.integration
def test_beam_search_survives_a_killed_server(make_swarm, local_model, tokenizer):
    """The replacement server is rebuilt from a history whose rows followed every reorder."""
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    options = dict(max_new_tokens=16, return_dict_in_generate=True, output_scores=True, **BEAMS)
    expected = local_model.generate(inputs, **options)
    swarm = start_swarm(make_swarm, "0:8", "0:8")
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            DEMO_MODEL, initial_peers=swarm.initial_peers, request_timeout=10.0
        )
        try:
            by_peer = {p.peer_id: p for p in swarm.processes if p.peer_id}
            with model.inference_session(max_length=inputs.shape[1] + 16) as session:
                step, killed, reorders = session._step, [], []

                def step_then_kill(hidden, start, hypo_ids, prompts):
                    reorders.append(hypo_ids is not None)
                    if len(reorders) == 8:  # after several reorders: the history must replay them
                        killed.append(session.route[0].peer_id)
                        by_peer[killed[0]].kill()
                    return step(hidden, start, hypo_ids, prompts)

                session._step = step_then_kill
                actual = model.generate(inputs, session=session, **options)
                assert killed and killed[0] not in {span.peer_id for span in session.route}
                assert any(reorders[:8])
            assert actual.sequences.tolist() == expected.sequences.tolist()
            # The scores sum every step's log-probabilities: a cache rebuilt with rows out of order
            # shows there even where the tokens happen to survive it.
            torch.testing.assert_close(actual.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=0)
        finally:
            model.close()
    finally:
        swarm.close()
