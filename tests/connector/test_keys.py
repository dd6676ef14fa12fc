"""Chunk keys: chained, deterministic across processes, sensitive to everything that matters."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest

from splitwise_local.connector.keys import (
    KeyExtras,
    KeyIdentity,
    MultimodalItem,
    Uncovered,
    chunk_keys,
    chunk_spans,
    key_identity,
    mla_layout,
    model_fingerprint,
    per_head_layout,
    request_key_extras,
)
from splitwise_local.connector.lookups import Lookup
from splitwise_local.connector.planner import Planner, StepPlan, prompt_chunks

IDENTITY = KeyIdentity("SmolLM2|LlamaForCausalLM|30", "bfloat16", "per-head/3x64", 32)


def test_spans_cover_the_prompt_with_a_partial_last_chunk():
    assert chunk_spans(70, 32) == [(0, 32), (32, 64), (64, 70)]
    assert chunk_spans(20, 32) == [(0, 20)]
    assert chunk_spans(64, 32) == [(0, 32), (32, 64)]
    assert chunk_spans(0, 32) == []


def test_equal_prefixes_share_keys_and_a_change_breaks_the_chain():
    a = chunk_keys(IDENTITY, list(range(100)))
    b = chunk_keys(IDENTITY, list(range(64)) + [7] * 36)
    assert len(a) == 4
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]
    early = chunk_keys(IDENTITY, [999, *range(1, 100)])
    assert all(x != y for x, y in zip(a, early, strict=True))


def test_partial_chunk_differs_from_full_chunk_with_same_start():
    assert chunk_keys(IDENTITY, list(range(40)))[1] != chunk_keys(IDENTITY, list(range(64)))[1]


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other-model"},
        {"dtype": "float16"},
        {"layout": "mla-latent/576"},
        {"chunk_size": 16},
        {"tp_size": 2},
        {"tp_size": 2, "tp_rank": 1},
        {"pp_size": 2},
        {"pp_size": 2, "pp_rank": 1},
    ],
)
def test_every_identity_field_changes_the_keys(change):
    tokens = list(range(50))
    assert chunk_keys(replace(IDENTITY, **change), tokens)[0] != chunk_keys(IDENTITY, tokens)[0]


def test_ranks_outside_the_parallel_sizes_are_refused():
    with pytest.raises(ValueError, match="rank"):
        replace(IDENTITY, tp_size=2, tp_rank=2)


def test_keys_do_not_depend_on_the_process_or_hash_seed():
    code = (
        "from splitwise_local.connector.keys import KeyIdentity, chunk_keys;"
        "print(chunk_keys(KeyIdentity('m','d','l',32), list(range(70)))[-1])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("0", "1", "12345")
    }
    assert len(outputs) == 1
    assert outputs == {chunk_keys(KeyIdentity("m", "d", "l", 32), list(range(70)))[-1]}


def test_the_keys_module_imports_neither_vllm_nor_torch():
    code = (
        "import sys, splitwise_local.connector.keys;"
        "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- model fingerprints --------------------------------------------------------------------


def make_checkpoint(folder, tensors: dict, **config) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    body = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, **config}
    (folder / "config.json").write_text(json.dumps(body))
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")


@pytest.fixture
def weights() -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    return {
        f"layers.{i}.{name}": torch.randn(256, 256, generator=generator).bfloat16()
        for i in range(4)
        for name in ("q_proj", "v_proj", "mlp")
    }


def test_same_named_fine_tunes_of_one_base_do_not_share_a_fingerprint(tmp_path, weights):
    import torch

    # A merged low-rank update on one projection of one layer: same names, sizes and shapes.
    tuned = dict(weights)
    update = torch.randn(256, 4) @ torch.randn(4, 256) * 1e-2
    tuned["layers.2.v_proj"] = (weights["layers.2.v_proj"].float() + update).bfloat16()
    make_checkpoint(tmp_path / "a" / "model", weights)
    make_checkpoint(tmp_path / "b" / "model", tuned)
    a, b = (tmp_path / "a" / "model", tmp_path / "b" / "model")
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    assert model_fingerprint(a) != model_fingerprint(b)


def test_other_weight_formats_are_sampled_across_the_file(tmp_path):
    base = bytes(range(256)) * 16384  # 4 MiB
    tuned = bytes((x + 1) % 256 for x in base)  # a dense change, as a fine-tune makes
    for name, data in (("a", base), ("b", tuned)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.gguf").write_bytes(data)
    assert model_fingerprint(tmp_path / "a") != model_fingerprint(tmp_path / "b")


def test_a_changed_config_changes_the_fingerprint(tmp_path, weights):
    make_checkpoint(tmp_path / "a", weights)
    make_checkpoint(tmp_path / "b", weights, rope_theta=20000.0)
    assert model_fingerprint(tmp_path / "a") != model_fingerprint(tmp_path / "b")


def test_a_copy_elsewhere_or_resaved_keeps_the_fingerprint(tmp_path, weights):
    make_checkpoint(tmp_path / "original", weights, transformers_version="4.40")
    shutil.copytree(tmp_path / "original", tmp_path / "copy-on-another-host")
    resaved = tmp_path / "resaved"
    make_checkpoint(resaved, weights, transformers_version="4.57", _name_or_path="/x")
    (resaved / "tokenizer.json").write_text('{"changed": true}')  # KV depends on ids, not this
    prints = {model_fingerprint(tmp_path / n) for n in ("original", "copy-on-another-host")}
    prints.add(model_fingerprint(resaved))
    assert len(prints) == 1


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path)
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path / "no-such-model")


def test_key_identity_normalises_the_dtype(tmp_path, weights):
    make_checkpoint(tmp_path / "m", weights)
    a = key_identity(tmp_path / "m", dtype="torch.bfloat16", layout="l", chunk_size=8)
    b = key_identity(str(tmp_path / "m"), dtype="bfloat16", layout="l", chunk_size=8)
    assert a == b and a.dtype == "bfloat16"


# ---- the connector builds its identity through the same function --------------------------


def simulated_vllm_config(model_dir, *, tp=1, pp=1, kv_heads=3, use_mla=False, cache="auto"):
    """The few vLLM config facts the connector reads, as vLLM's objects present them."""
    import torch

    model_config = SimpleNamespace(
        model=str(model_dir),
        dtype=torch.bfloat16,
        use_mla=use_mla,
        get_head_size=lambda: 576 if use_mla else 64,
        get_num_kv_heads=lambda parallel: max(1, kv_heads // parallel.tensor_parallel_size),
    )
    return SimpleNamespace(
        model_config=model_config,
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
        cache_config=SimpleNamespace(cache_dtype=cache),
    )


@pytest.mark.parametrize(
    ("simulated", "facts"),
    [
        ({}, {"dtype": "bfloat16", "layout": per_head_layout(3, 64)}),
        ({"cache": "fp8_e4m3"}, {"dtype": "fp8_e4m3", "layout": per_head_layout(3, 64)}),
        ({"use_mla": True}, {"dtype": "bfloat16", "layout": mla_layout(576)}),
        (
            {"tp": 4, "pp": 2, "kv_heads": 8},
            {"dtype": "bfloat16", "layout": per_head_layout(2, 64), "tp_size": 4, "pp_size": 2},
        ),
    ],
)
def test_the_engine_identity_equals_the_one_built_from_plain_facts(
    tmp_path, weights, simulated, facts
):
    from splitwise_local.config import SplitwiseConfig
    from splitwise_local.connector.connector import engine_key_identity

    make_checkpoint(tmp_path / "m", weights)
    vllm_config = simulated_vllm_config(tmp_path / "m", **simulated)
    config = SplitwiseConfig(chunk_size=128)
    engine = engine_key_identity(vllm_config, config)
    assert engine == key_identity(tmp_path / "m", chunk_size=128, **facts)
    if engine.tp_size > 1:
        ranked = engine_key_identity(vllm_config, config, tp_rank=3, pp_rank=1)
        assert ranked == replace(engine, tp_rank=3, pp_rank=1)
        assert ranked.rank_index == 7


def test_each_rank_has_its_own_chain():
    """(That the store must hold every rank's key of a chunk: test_planner.py.)"""
    identity = replace(IDENTITY, tp_size=2, pp_size=2)
    tokens = list(range(80))
    chunks = prompt_chunks(identity, tokens)
    assert [len(set(c.keys)) for c in chunks] == [4, 4, 4]
    ranks = identity.all_ranks()
    assert [r.rank_index for r in ranks] == [0, 1, 2, 3]
    for rank in ranks:
        assert [c.keys[rank.rank_index] for c in chunks] == chunk_keys(rank, tokens)
    assert [c.key for c in chunks] == chunk_keys(identity, tokens)  # rank 0: the proxy's keys


# ---- what vLLM's block hash covers besides the tokens ---------------------------------------

TOKENS = list(range(1000, 1100))  # chunks [0, 32), [32, 64), [64, 96), [96, 100)
IMAGE = MultimodalItem("image-hash-1", 40, 30)  # placeholder tokens 40-69: chunks 1 and 2


def test_cache_salt_separates_every_key_and_the_same_salt_gives_the_same_keys():
    plain = chunk_keys(IDENTITY, TOKENS)
    a = chunk_keys(IDENTITY, TOKENS, KeyExtras(cache_salt="tenant-a"))
    b = chunk_keys(IDENTITY, TOKENS, KeyExtras(cache_salt="tenant-b"))
    assert all(len({x, y, z}) == 3 for x, y, z in zip(plain, a, b, strict=True))
    assert chunk_keys(IDENTITY, TOKENS, KeyExtras(cache_salt="tenant-a")) == a
    # As in vLLM, an empty salt is no salt.
    assert chunk_keys(IDENTITY, TOKENS, KeyExtras(cache_salt="")) == plain


@pytest.mark.parametrize(
    "other",
    [
        KeyExtras(lora=("adapter-b", "/adapters/a")),  # another name
        KeyExtras(lora=("adapter-a", "/adapters/b")),  # the name pointed at another adapter
        KeyExtras(),  # the base model
    ],
)
def test_each_lora_adapter_has_its_own_keys(other):
    adapter = chunk_keys(IDENTITY, TOKENS, KeyExtras(lora=("adapter-a", "/adapters/a")))
    assert all(x != y for x, y in zip(adapter, chunk_keys(IDENTITY, TOKENS, other), strict=True))


def test_a_multimodal_hash_keys_the_chunks_its_placeholder_overlaps_and_all_after():
    image_1 = chunk_keys(IDENTITY, TOKENS, KeyExtras(multimodal=(IMAGE,)))
    image_2 = chunk_keys(
        IDENTITY, TOKENS, KeyExtras(multimodal=(MultimodalItem("image-hash-2", 40, 30),))
    )
    moved = chunk_keys(
        IDENTITY, TOKENS, KeyExtras(multimodal=(MultimodalItem(IMAGE.identifier, 41, 30),))
    )
    plain = chunk_keys(IDENTITY, TOKENS)
    for other in (image_2, moved, plain):
        assert other[0] == image_1[0]  # tokens 0-31 precede the image
        assert all(x != y for x, y in zip(image_1[1:], other[1:], strict=True))
    assert KeyExtras(multimodal=(IMAGE,)).for_chunk(96, 100) == []


def test_the_extras_are_vllms_own_block_hash_extras():
    """For chunks as large as vLLM's blocks, each chunk's extras equal vLLM's
    `generate_block_hash_extra_keys` for that block, on vLLM's own `Request`."""
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys
    from vllm.v1.request import Request

    request = make_request(
        TOKENS,
        cache_salt="tenant-a",
        lora=("adapter-a", "/adapters/a"),
        images=[("i", 10, 5), ("j", 40, 30)],
    )
    assert isinstance(request, Request)
    extras = request_key_extras(request)
    mm_index = 0
    for start, end in chunk_spans(len(TOKENS), IDENTITY.chunk_size):
        theirs, mm_index = generate_block_hash_extra_keys(request, start, end, mm_index)
        assert extras.for_chunk(start, end) == list(theirs or ())
    assert extras.for_chunk(0, 32)[-1] == ("cache_salt", "tenant-a")


def make_request(tokens, *, req_id="r", cache_salt=None, lora=None, images=(), embeds=False):
    """A vLLM `Request` as its engine core builds one (images: (hash, offset, length))."""
    # vLLM and torch are heavy: imported by the tests that build a request, not at collection.
    import torch
    from vllm.lora.request import LoRARequest
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    features = [
        MultiModalFeatureSpec(
            data=None,
            modality="image",
            identifier=identifier,
            mm_position=PlaceholderRange(offset=offset, length=length),
        )
        for identifier, offset, length in images
    ]
    return Request(
        req_id,
        None if embeds else list(tokens),
        SamplingParams(max_tokens=4),
        None,
        prompt_embeds=torch.zeros(len(tokens), 8) if embeds else None,
        mm_features=features,
        lora_request=LoRARequest(lora[0], 1, lora[1]) if lora else None,
        cache_salt=cache_salt,
    )


def test_prompt_embeddings_are_not_covered():
    with pytest.raises(Uncovered, match="prompt embeddings"):
        request_key_extras(make_request(TOKENS, embeds=True))


def planner_over(stored: set[str], *, loads: bool, saves: bool) -> Planner:
    def lookup(req_id, keys):
        present = next((i for i, key in enumerate(keys) if key not in stored), len(keys))
        return Lookup(present, False)

    return Planner(IDENTITY, lookup, block_size=32, loads=loads, saves=saves, keep_tail=True)


def saved_by_producer(request) -> set[str]:
    """The keys a producer's planner saves for `request`, admitted as the connector does."""
    producer = planner_over(set(), loads=False, saves=True)
    producer.admit(request.request_id, request_key_extras(request))
    plan = StepPlan()
    producer.new_request(request.request_id, TOKENS, [0, 1, 2, 3], 0, len(TOKENS), plan)
    return {chunk.key for save in plan.saves for chunk in save.chunks}


@pytest.mark.parametrize(
    ("saved_as", "asked_as", "loaded"),
    [
        ({"cache_salt": "a"}, {"cache_salt": "b"}, 0),
        ({"cache_salt": "a"}, {}, 0),
        ({}, {"cache_salt": "a"}, 0),
        ({"cache_salt": "a"}, {"cache_salt": "a"}, 99),
        ({"lora": ("a", "/a")}, {"lora": ("b", "/b")}, 0),
        ({"lora": ("a", "/a")}, {"lora": ("a", "/b")}, 0),
        ({"lora": ("a", "/a")}, {}, 0),
        ({"lora": ("a", "/a")}, {"lora": ("a", "/a")}, 99),
        # Another image in the same place: only the 32 tokens before it are shared.
        ({"images": [("cat", 40, 30)]}, {"images": [("dog", 40, 30)]}, 32),
        ({"images": [("cat", 40, 30)]}, {"images": [("cat", 41, 30)]}, 32),
        ({"images": [("cat", 40, 30)]}, {"images": [("cat", 40, 30)]}, 99),
    ],
)
def test_a_consumer_loads_only_what_was_saved_under_the_same_extras(saved_as, asked_as, loaded):
    stored = saved_by_producer(make_request(TOKENS, req_id="p", **saved_as))
    assert len(stored) == 4
    request = make_request(TOKENS, req_id="d", **asked_as)
    consumer = planner_over(stored, loads=True, saves=False)
    consumer.admit(request.request_id, request_key_extras(request))
    assert consumer.match(request.request_id, TOKENS, 0) == loaded


def test_an_uncovered_request_is_neither_loaded_nor_saved():
    everything = {c.key for c in prompt_chunks(IDENTITY, TOKENS)}
    p = planner_over(everything, loads=True, saves=True)
    p.admit("r", None)
    assert p.match("r", TOKENS, 0) == 0
    plan = StepPlan()
    p.new_request("r", TOKENS, [0, 1, 2, 3], 0, len(TOKENS), plan)
    assert plan.saves == []
    p.finished("r")  # the next request of that id starts afresh
    assert p.match("r", TOKENS, 0) == len(TOKENS) - 1
