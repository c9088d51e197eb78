"""From a model name to a GGUF: names, downloads from a Hub on 127.0.0.1 (tests/fake_hub.py), the store,
and the profile fitted to machines of several sizes. Nothing here reaches beyond this machine."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen35.cli import main
from qwen35.convert.pipeline import convert
from qwen35.demo.synthetic import write_checkpoint
from qwen35.runtime.engine.repack import AMX_IN_USE  # noqa: E402
from qwen35.models import ModelError, fit, hub, store
from qwen35.models.names import ModelName, parse
from qwen35.runtime.engine import memory
from tests.fake_hub import GRANTED_TOKEN, FakeHub, FakeRepo
from tests.tiny import RELEASE_CONFIGS, byte_level_tokenizer, tiny_config

CKPT_REPO, GGUF_REPO = "Qwen/Qwen3.5-Tiny", "someone/Qwen3.5-Tiny-GGUF"
# A machine where the tiny model fits at any profile (bf16 first), and nothing else.
ROOMY = fit.Machine(8 * fit.GIB, frozenset(), 2, False)


# --- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Qwen/Qwen3.5-4B", ModelName("Qwen/Qwen3.5-4B")),
    ("Qwen/Qwen3.5-4B:Q4_K_M", ModelName("Qwen/Qwen3.5-4B", None, "q4_k_m")),
    ("Qwen/Qwen3.5-4B@v1.0:q8_0", ModelName("Qwen/Qwen3.5-4B", "v1.0", "q8_0")),
    ("unsloth/Qwen3.5-4B-GGUF:Q4_K_M", ModelName("unsloth/Qwen3.5-4B-GGUF", None, "q4_k_m")),
    ("qwen3.5:4b", ModelName("Qwen/Qwen3.5-4B")),
    ("qwen3.5:0.8b:q8_0", ModelName("Qwen/Qwen3.5-0.8B", None, "q8_0")),
    ("Qwen3.5:4B-q4_k_m", ModelName("Qwen/Qwen3.5-4B", None, "q4_k_m")),
    ("qwen3.5:35b-a3b", ModelName("Qwen/Qwen3.5-35B-A3B")),
    ("qwen3.5:35b-a3b-q4_k_m", ModelName("Qwen/Qwen3.5-35B-A3B", None, "q4_k_m")),
    ("qwen3.6:27b", ModelName("Qwen/Qwen3.6-27B")),
    ("model.gguf", None), ("./Qwen/Qwen3.5-4B", None), ("/models/Qwen3.5-4B", None), ("ckpt", None),
])
def test_names_parse_as_the_peers_spell_them(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("text, says", [("qwen3.5:5b", "qwen3.5 has no release '5b'"),
                                        ("llama3:8b", "unknown model name 'llama3:8b'")])
def test_a_short_name_that_is_not_a_release_is_one_line(text, says):
    with pytest.raises(ModelError, match=says):
        parse(text)


def test_every_release_in_the_table_has_its_config_and_the_converter_reads_it():
    """The table's Qwen3.5 sizes are the releases whose configs the repo keeps (and plans from)."""
    from qwen35.models.names import releases

    kept = {p.name.split(".config")[0].removeprefix("qwen3.5-") for p in RELEASE_CONFIGS.glob("qwen3.5-*.json")}
    assert set(releases()["qwen3.5"]) == kept


# --- the profile that fits ----------------------------------------------------------------------


def _release(name: str) -> dict:
    return json.loads((RELEASE_CONFIGS / f"{name}.json").read_text())


@pytest.mark.parametrize("gib, expected", [(4, None), (5.4, "q2_k"), (6, "q2_k"), (8, "q3_k_m"), (10, "q5_k_m"), (12, "q6_k"),
                                           (16, "q8_0"), (24, "bf16")])
def test_the_9b_release_gets_the_best_profile_that_fits_each_machine(gib, expected):
    machine = fit.Machine(int(gib * fit.GIB), frozenset(), 4, False)
    chosen = fit.choose_profile(_release("qwen3.5-9b.config"), "Qwen3.5-9B", 8192, machine)
    assert chosen.profile == expected, chosen.reason  # at 5.4 GiB q2_k fits only without the read-back snapshots
    if expected is None:
        assert chosen.reason.startswith("Qwen3.5-9B does not fit this machine at 8k context")
        return
    # Never one the load would refuse: the runtime's own check on the profile's GGUF header passes.
    base = memory.as_profile(fit.release_model(_release("qwen3.5-9b.config")), expected) if expected != "bf16" \
        else fit.release_model(_release("qwen3.5-9b.config"))
    mmproj = fit.release_mmproj(_release("qwen3.5-9b.config"))
    sizes = dict(n_batch=512, n_checkpoints=5, threads=4, features=frozenset(), mmproj=mmproj)
    # As the decoder decides at load: with the read-back snapshots, else without them, else refused.
    refused = [memory.check_fits(base, memory.estimate(base, 8192, **sizes, process=0, image_max_tokens=1024,
                                                       read_back=read_back), machine.available, **sizes)
               for read_back in (memory.READ_BACK, 0)]
    assert None in refused
    assert chosen.need + machine.headroom <= machine.available or "only" in chosen.reason


def test_a_server_s_checkpoint_cache_is_counted_in_the_fit():
    """`serve` keeps --cache-ram (2 GiB by default) of conversation checkpoints; its load counts them."""
    machine = fit.Machine(12 * fit.GIB, frozenset(), 4, False)
    config = _release("qwen3.5-9b.config")
    as_run = fit.choose_profile(config, "Qwen3.5-9B", 8192, machine)
    as_served = fit.choose_profile(config, "Qwen3.5-9B", 8192, machine, cache_ram=2048 << 20)
    assert (as_run.profile, as_served.profile) == ("q6_k", "q5_k_m") and as_served.need > as_run.need


def test_where_amx_runs_the_fit_counts_its_copy_of_the_weights():
    """AMX holds a copy of the weights it takes (the decoder's estimate counts it: memory.estimate
    with AMX_IN_USE); the fit must too, or it picks a profile the load then refuses."""
    config = _release("qwen3.5-9b.config")
    plain = fit.Machine(16 * fit.GIB, frozenset(), 4, False)
    seen = []
    amx = fit.Machine(16 * fit.GIB, frozenset(), 4, False, amx_takes=lambda types: seen.append(set(types)) or True)
    q8 = memory.as_profile(fit.release_model(config), "q8_0")
    mmproj = fit.release_mmproj(config)
    with_copy = fit.needed(q8, mmproj, 8192, amx)
    assert with_copy > fit.needed(q8, mmproj, 8192, plain)
    sizes = dict(n_batch=512, n_checkpoints=5, threads=4, mmproj=mmproj, process=0, image_max_tokens=1024)
    assert with_copy == memory.estimate(q8, 8192, **sizes, features=frozenset({AMX_IN_USE}), read_back=memory.READ_BACK).needed
    assert 8 in seen[0]  # asked about the profile's own types (Q8_0 = 8)
    # So on a machine where q8_0 fits only without AMX's copy (13 GiB), AMX makes the fit step down.
    chosen = [fit.choose_profile(config, "Qwen3.5-9B", 8192, fit.Machine(13 * fit.GIB, frozenset(), 4, False,
                                                                         amx_takes=lambda types, on=on: on)).profile
              for on in (False, True)]
    assert chosen == ["q8_0", "q6_k"]


def test_the_reason_names_the_better_profile_that_did_not_fit():
    machine = fit.Machine(10 * fit.GIB, frozenset(), 4, False)
    reason = fit.choose_profile(_release("qwen3.5-9b.config"), "Qwen3.5-9B", 8192, machine).reason
    assert reason == "Qwen3.5-9B: q6_k (8.8 GiB) would leave 1.2 GiB free at 8k context; taking q5_k_m, 8.0 GiB"


def test_sizes_under_a_tenth_of_a_gib_are_said_in_mib():
    assert fit._gib(int(8.84 * fit.GIB)) == "8.8 GiB" and fit._gib(40 << 20) == "40 MiB"


def test_arm_boards_try_edge_arm_at_the_4_bit_step_and_never_plain_q4_0():
    x86, arm = fit.profile_order(arm=False), fit.profile_order(arm=True)
    assert "edge-arm" not in x86 and arm.index("edge-arm") == arm.index("q4_k_m") + 1
    assert not {"q4_0", "q4_1", "iq4_nl"} & set(arm) and [p for p in arm if p != "edge-arm"] == list(x86)
    # The reason line names it when it is the better profile that did not fit.
    config = _release("qwen3.5-4b.config.RECONSTRUCTED")
    a76 = frozenset({"NEON", "ARM_FMA", "FP16_VA", "DOTPROD", "REPACK"})
    reason = fit.choose_profile(config, "Qwen3.5-4B", 4096, fit.Machine(int(5.2 * fit.GIB), a76, 4, True)).reason
    assert reason.startswith("Qwen3.5-4B: edge-arm (") and "taking q3_k_m" in reason, reason


# --- a Hub on 127.0.0.1 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    ckpt = write_checkpoint(tmp_path_factory.mktemp("tiny") / "Qwen3.5-Tiny", tiny_config(), vision=True)
    byte_level_tokenizer(ckpt)
    (ckpt / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Qwen3.5-Tiny\n")
    return ckpt


@pytest.fixture(scope="module")
def tiny_gguf_repo(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf")
    bf16, q8_0, mmproj = convert(tiny_checkpoint, ["bf16", "q8_0"], out, mmproj="f16")
    repo = out / "repo"
    repo.mkdir()
    shutil.move(bf16.path, repo / "Qwen3.5-Tiny-BF16.gguf")
    shutil.move(q8_0.path, repo / "Qwen3.5-Tiny-Q8_0.gguf")
    shutil.move(mmproj.path, repo / "mmproj-F16.gguf")
    (repo / "README.md").write_text("# GGUF files\n")
    return repo


@pytest.fixture
def fake_hub(tiny_checkpoint, tiny_gguf_repo, tmp_path, monkeypatch):
    checkpoint = FakeRepo.from_dir(tiny_checkpoint)
    checkpoint.files["original/model.safetensors"] = b"a copy in another layout, not read by the converter"
    checkpoint.files[".gitattributes"] = b"*.safetensors filter=lfs\n"
    llama_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    repos = {CKPT_REPO: checkpoint,
             "Qwen/Qwen3.5-Gated": FakeRepo(dict(checkpoint.files), gated=True),
             "Qwen/Qwen3.5-Private": FakeRepo(dict(checkpoint.files), private=True),
             "meta/Llama-Tiny": FakeRepo({"config.json": json.dumps(llama_config).encode(),
                                          "model.safetensors": b"\0" * 64}),
             GGUF_REPO: FakeRepo.from_dir(tiny_gguf_repo, gguf_architecture="qwen35"),
             "someone/Llama-Tiny-GGUF": FakeRepo({"Llama-Tiny-Q8_0.gguf": _llama_gguf(tmp_path)})}
    for key in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("QWEN35_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda s: None)  # its retry pause
    with FakeHub(repos) as hub_server:
        monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
        yield hub_server


def _llama_gguf(tmp_path: Path) -> bytes:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return (tmp_path / "llama.gguf").read_bytes()


def _pull(text: str, **kwargs) -> store.StoredModel:
    return store.pull(parse(text), machine=kwargs.pop("machine", ROOMY), say=lambda line: None, **kwargs)


def test_pull_converts_into_the_store_from_the_standard_cache_fetching_only_what_the_converter_reads(fake_hub, tmp_path):
    entry = _pull(f"{CKPT_REPO}:q8_0")
    assert entry.directory == tmp_path / "models" / CKPT_REPO / "q8_0"
    assert entry.model.name == "Qwen3.5-Tiny-Q8_0.gguf" and entry.mmproj.name == "Qwen3.5-Tiny-mmproj-F16.gguf"
    assert entry.model.is_file() and entry.mmproj.is_file()
    # huggingface_hub's cache layout: refs/main → the commit, snapshots/<commit>/<file> → blobs/<etag>.
    repo_cache = tmp_path / "hf" / "hub" / "models--Qwen--Qwen3.5-Tiny"
    commit = (repo_cache / "refs" / "main").read_text()
    assert commit == fake_hub.repos[CKPT_REPO].commit
    weights = repo_cache / "snapshots" / commit / "model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent == repo_cache / "blobs"
    assert weights.resolve().name == hub.hashlib.sha256(weights.read_bytes()).hexdigest()  # LFS blobs go by SHA-256
    fetched = {path.rsplit("/", 1)[-1] for _, path, _ in fake_hub.downloads() if "/resolve/" in path}
    assert not [p for _, p, _ in fake_hub.requests if "/original/" in p]
    assert ".gitattributes" not in fetched and "config.json" in fetched
    assert not list((tmp_path / "models").glob(".pulling-*"))


def test_a_second_pull_downloads_nothing(fake_hub):
    written = _pull(f"{CKPT_REPO}:q8_0").model.stat().st_mtime_ns
    fake_hub.requests.clear()
    said = []
    entry = store.pull(parse(f"{CKPT_REPO}:q8_0"), machine=ROOMY, say=said.append)
    assert said == [f"{CKPT_REPO}:q8_0 is up to date ({fake_hub.repos[CKPT_REPO].commit[:12]})"]
    assert entry.model.stat().st_mtime_ns == written  # not converted again either
    assert fake_hub.downloads() == [] and all(r[0] != "HEAD" for r in fake_hub.requests)


def test_a_transfer_cut_off_midway_resumes_from_where_it_stopped(fake_hub, monkeypatch):
    # huggingface_hub writes what it receives in chunks of DOWNLOAD_CHUNK_SIZE (10 MB) and resumes after the
    # last chunk written; the tiny checkpoint is smaller than one, so the chunks are made small here.
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 1024)
    fake_hub.cut["model.safetensors"] = 5000
    entry = _pull(f"{CKPT_REPO}:bf16")  # the blob's SHA-256 is checked after the transfer
    assert entry.model.is_file()
    ranges = [r[2] for r in fake_hub.downloads() if r[2]]
    assert ranges == ["bytes=4096-"]  # the four whole chunks received before the cut are kept


def test_a_download_that_keeps_failing_says_so_and_the_next_try_fetches_only_the_rest(fake_hub, tmp_path):
    fake_hub.cut_always["model.safetensors"] = 100  # huggingface_hub's own retries fail too
    with pytest.raises(ModelError, match="was cut off; run the command again"):
        _pull(f"{CKPT_REPO}:q8_0")
    assert not (tmp_path / "models" / CKPT_REPO).exists()  # nothing half-written in the store
    fake_hub.cut_always.clear()
    fake_hub.requests.clear()
    _pull(f"{CKPT_REPO}:q8_0")
    # Only the weights again: the small files fetched before them were kept by the first try.
    blob = hub.hashlib.sha256(fake_hub.repos[CKPT_REPO].files["model.safetensors"]).hexdigest()
    assert [path for _, path, _ in fake_hub.downloads()] == [f"/{blob}"]


def test_a_stored_name_runs_without_a_request_even_with_the_hub_reachable(fake_hub):
    _pull(f"{CKPT_REPO}:q8_0")
    fake_hub.requests.clear()
    for text in (f"{CKPT_REPO}:q8_0", CKPT_REPO):  # with its profile, and the best stored one
        path, mmproj = store.resolve(text, machine=ROOMY)
        assert Path(path).name == "Qwen3.5-Tiny-Q8_0.gguf" and mmproj.name == "Qwen3.5-Tiny-mmproj-F16.gguf"
    assert fake_hub.requests == []


def test_of_several_stored_profiles_the_best_that_fits_now_is_taken(fake_hub):
    from qwen35.runtime.engine.modelfile import read_model_file

    small, large = _pull(f"{CKPT_REPO}:q8_0"), _pull(f"{CKPT_REPO}:bf16")
    assert store.resolve(CKPT_REPO, machine=ROOMY)[0] == str(large.model)
    need = fit.needed(read_model_file(small.model), read_model_file(small.mmproj), 4096, ROOMY)
    tight = fit.Machine(need, frozenset(), 2, False)
    assert store.resolve(CKPT_REPO, machine=tight)[0] == str(small.model)


def test_offline_a_stored_name_and_a_cached_checkpoint_work_without_a_request(fake_hub, monkeypatch):
    _pull(f"{CKPT_REPO}:q8_0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub.requests.clear()
    path, mmproj = store.resolve(f"{CKPT_REPO}:q8_0", machine=ROOMY)
    assert Path(path).is_file() and mmproj is not None
    # Another profile of the cached checkpoint converts without the hub.
    path, _ = store.resolve(f"{CKPT_REPO}:q4_k_m", assume_yes=True, machine=ROOMY)
    assert Path(path).name == "Qwen3.5-Tiny-Q4_K_M.gguf"
    assert fake_hub.requests == []


def test_offline_a_missing_name_says_what_to_copy_where(fake_hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as e:
        _pull(f"{CKPT_REPO}:q8_0")
    message = str(e.value)
    assert "HF_HUB_OFFLINE is set" in message and f"qwen35 pull {CKPT_REPO}:q8_0" in message
    assert str(tmp_path / "models") in message and "\n" not in message
    assert fake_hub.requests == []


def test_with_the_hub_unreachable_a_cached_checkpoint_still_converts(fake_hub, monkeypatch):
    _pull(f"{CKPT_REPO}:q8_0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    entry = _pull(f"{CKPT_REPO}:q6_k")
    assert entry.model.name == "Qwen3.5-Tiny-Q6_K.gguf"


@pytest.mark.parametrize("name, token, says", [
    ("Qwen/No-Such-Model", None, "Qwen/No-Such-Model not found on http://127.0.0.1:.* set HF_TOKEN"),
    ("Qwen/Qwen3.5-Private", None, "Qwen/Qwen3.5-Private not found on .*if it is private, set HF_TOKEN"),
    ("Qwen/Qwen3.5-Private", "hf_other", "Qwen/Qwen3.5-Private not found on .*, or HF_TOKEN cannot read it"),
    ("Qwen/Qwen3.5-Gated", None, "Qwen/Qwen3.5-Gated is gated: accept its terms at .* set HF_TOKEN"),
    ("Qwen/Qwen3.5-Gated", "hf_other", "Qwen/Qwen3.5-Gated is gated"),
    ("meta/Llama-Tiny", None, r"meta/Llama-Tiny is not a Qwen3.5 model \(its architecture: LlamaForCausalLM\)"),
    (f"{CKPT_REPO}@v9", None, f"{CKPT_REPO} has no revision 'v9'"),
])
def test_hub_errors_are_one_line_and_leave_nothing_in_the_store(fake_hub, monkeypatch, tmp_path, name, token, says):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    result = CliRunner().invoke(main, ["pull", f"{name}:q8_0"])
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: "), result.output
    assert __import__("re").search(says, line), line
    assert not list((tmp_path / "models").rglob("*.gguf"))


def test_a_granted_token_reads_a_gated_repo(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", GRANTED_TOKEN)
    assert _pull("Qwen/Qwen3.5-Gated:q8_0").model.is_file()


def test_a_revision_is_fetched_at_its_commit(fake_hub, monkeypatch, tmp_path):
    repo = fake_hub.repos[CKPT_REPO]
    entry = _pull(f"{CKPT_REPO}@{repo.commit}:q8_0")
    assert entry.manifest["commit"] == repo.commit
    # A tag at another commit: its files are fetched at that commit, and an offline run finds it by the tag.
    repo.branches["v1.0"] = "1" * 40
    entry = _pull(f"{CKPT_REPO}@v1.0:q4_k_m")
    assert entry.manifest["commit"] == "1" * 40 and entry.manifest["revision"] == "v1.0"
    # (asked for at that commit; the blobs it shares with the first pull are linked, not fetched again)
    assert {p.rsplit("/", 1)[-1] for _, p, _ in fake_hub.requests if f"/resolve/{'1' * 40}/" in p} >= \
        {"config.json", "model.safetensors"}
    repo_cache = tmp_path / "hf" / "hub" / "models--Qwen--Qwen3.5-Tiny"
    assert (repo_cache / "refs" / "v1.0").read_text() == "1" * 40
    assert (repo_cache / "snapshots" / ("1" * 40) / "model.safetensors").is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub.requests.clear()
    path, _ = store.resolve(f"{CKPT_REPO}@v1.0:q6_k", assume_yes=True, machine=ROOMY)
    assert Path(path).name == "Qwen3.5-Tiny-Q6_K.gguf" and fake_hub.requests == []


def test_a_full_disk_is_said_before_anything_is_fetched(fake_hub, monkeypatch, tmp_path):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    with pytest.raises(ModelError, match="not enough disk space: .* GB to download and write"):
        _pull(f"{CKPT_REPO}:q8_0")
    assert [r for r in fake_hub.downloads() if not r[1].endswith("config.json")] == []
    assert not (tmp_path / "models" / CKPT_REPO).exists()


def test_a_conversion_that_fails_midway_leaves_no_entry_and_no_partial_files(fake_hub, monkeypatch, tmp_path):
    from qwen35.convert import pipeline

    def fail(self, quantizer, progress):
        raise pipeline.ConvertError("no space left on device while writing (simulated)")

    _pull(f"{CKPT_REPO}:q8_0")
    monkeypatch.setattr(pipeline.Conversion, "_write_tensors", fail)
    with pytest.raises(ModelError, match="simulated"):
        _pull(f"{CKPT_REPO}:q4_k_m")
    models = tmp_path / "models"
    assert not (models / CKPT_REPO / "q4_k_m").exists() and not list(models.glob(".pulling-*"))
    assert (models / CKPT_REPO / "q8_0" / "model.json").is_file()  # what was there is untouched


def test_a_disk_that_fills_up_during_the_download_is_one_line(fake_hub, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", full)
    with pytest.raises(ModelError, match=r"no space left on the device of .*hub while downloading Qwen/Qwen3.5-Tiny; "
                                         r"free some and run the command again \(what was fetched is kept\)"):
        _pull(f"{CKPT_REPO}:q8_0")


def test_a_corrupted_download_is_caught_by_its_sha256_and_removed(fake_hub, tmp_path):
    repo = fake_hub.repos[CKPT_REPO]
    listing = hub.list_repo(parse(CKPT_REPO))
    listing.sha256["model.safetensors"] = "0" * 64  # what the hub says it should be
    with pytest.raises(ModelError, match="does not match the hub's SHA-256"):
        hub.download(listing, ["model.safetensors"])
    assert not (hub.snapshot_dir(listing) / "model.safetensors").exists()
    assert repo.commit == listing.commit


def test_a_gguf_repo_is_taken_with_its_mmproj_and_not_converted(fake_hub):
    entry = _pull(f"{GGUF_REPO}:Q8_0")
    assert entry.model.name == "Qwen3.5-Tiny-Q8_0.gguf" and entry.mmproj.name == "mmproj-F16.gguf"
    assert entry.manifest["source"] == "gguf repo" and entry.model.is_file()
    path, mmproj = store.resolve(f"{GGUF_REPO}:q8_0")
    assert Path(path) == entry.model and mmproj == entry.mmproj


def test_a_gguf_repo_without_the_asked_type_lists_the_ones_it_has(fake_hub):
    with pytest.raises(ModelError, match=f"{GGUF_REPO} has no Q4_K_M file: choose one of BF16, Q8_0"):
        _pull(f"{GGUF_REPO}:q4_k_m")


def test_a_gguf_repo_without_a_type_gets_the_largest_that_fits_judged_on_headers_alone(fake_hub):
    from qwen35.runtime.engine.modelfile import read_model_file

    said = []
    entry = store.pull(parse(GGUF_REPO), machine=ROOMY, say=said.append)
    assert entry.profile == "bf16" and said[0].startswith("Qwen3.5-Tiny-GGUF: bf16 (")
    # A machine where BF16 does not fit but Q8_0 does (with room to spare) gets Q8_0, and BF16 is
    # never downloaded: only its header was read, with a range request.
    mmproj = read_model_file(entry.mmproj)
    bf16_need = fit.needed(read_model_file(entry.model), mmproj, 4096, ROOMY)
    q8_need = fit.needed(read_model_file(_pull(f"{GGUF_REPO}:q8_0").model), mmproj, 4096, ROOMY)
    machine = fit.Machine(q8_need + fit.MIN_HEADROOM + (bf16_need - q8_need) // 2, frozenset(), 2, False)
    store.remove(parse(GGUF_REPO))
    shutil.rmtree(hub.cache_dir())
    fake_hub.requests.clear()
    said.clear()
    entry = store.pull(parse(GGUF_REPO), machine=machine, say=said.append)
    assert entry.profile == "q8_0" and said[0].startswith("Qwen3.5-Tiny-GGUF: bf16 ("), said
    bf16_blob = hub.hashlib.sha256(fake_hub.repos[GGUF_REPO].files["Qwen3.5-Tiny-BF16.gguf"]).hexdigest()
    bf16_gets = [r for r in fake_hub.downloads() if r[1] == f"/{bf16_blob}"]
    assert bf16_gets and all(r[2] and r[2].startswith("bytes=0-") for r in bf16_gets)


def test_a_gguf_header_longer_than_the_first_fetch_is_read_with_larger_ones(fake_hub, monkeypatch, tiny_gguf_repo):
    from qwen35.runtime.engine.modelfile import read_model_file

    monkeypatch.setattr(hub, "HEADER_FETCH", 1024)
    listing = hub.list_repo(parse(GGUF_REPO))
    remote = hub.gguf_header(listing, ["Qwen3.5-Tiny-Q8_0.gguf"])
    local = read_model_file(tiny_gguf_repo / "Qwen3.5-Tiny-Q8_0.gguf")
    assert remote.tensors == local.tensors and remote.metadata == local.metadata and remote.size == local.size
    ranges = [r[2] for r in fake_hub.downloads() if "/resolve/" not in r[1]]  # at the CDN
    assert ranges[:3] == ["bytes=0-1023", "bytes=0-4095", "bytes=0-16383"] 
    assert hub.missing_files(listing, ["Qwen3.5-Tiny-Q8_0.gguf"])  # nothing downloaded into the cache


def test_a_gguf_repo_of_another_architecture_is_refused_before_its_weights_are_downloaded(fake_hub):
    with pytest.raises(ModelError, match="someone/Llama-Tiny-GGUF is not a Qwen3.5 model .*GGUF architecture: llama"):
        _pull("someone/Llama-Tiny-GGUF:q8_0")
    assert all(r[2] for r in fake_hub.downloads())  # range requests for the header only


def test_without_a_profile_the_pull_fits_one_and_says_why(fake_hub):
    said = []
    tight = fit.Machine(1, frozenset(), 2, False)  # one byte: nothing fits
    with pytest.raises(ModelError, match="Qwen3.5-Tiny does not fit this machine at 4k context"):
        store.pull(parse(CKPT_REPO), machine=tight, say=said.append)
    entry = store.pull(parse(CKPT_REPO), machine=ROOMY, say=said.append)
    assert entry.profile == "bf16" and said[-2].startswith("Qwen3.5-Tiny: bf16 (")


# --- the commands -----------------------------------------------------------------------------------


def test_run_list_and_rm_by_name(fake_hub, monkeypatch):
    monkeypatch.setattr("qwen35.system.available_ram", lambda: 8 * fit.GIB)
    runner = CliRunner()
    refused = runner.invoke(main, ["run", f"{CKPT_REPO}:q8_0", "-p", "hi", "--max-tokens", "2"])
    assert refused.exit_code == 1 and f"run `qwen35 pull {CKPT_REPO}:q8_0` first, or pass --yes" in refused.output
    ran = runner.invoke(main, ["run", f"{CKPT_REPO}:q8_0", "-p", "hi", "--max-tokens", "2", "--seed", "0", "--yes"])
    assert ran.exit_code == 0, ran.output
    listed = runner.invoke(main, ["list"])
    assert listed.exit_code == 0
    header, row = listed.output.strip().splitlines()
    assert header.split()[:6] == ["NAME", "PROFILE", "SIZE", "CONTEXT", "VISION", "MTP"]
    assert row.split()[:7] == [CKPT_REPO, "q8_0", row.split()[2], "GB", "4,096", "yes", "yes"]
    assert runner.invoke(main, ["rm", CKPT_REPO]).output == f"removed {CKPT_REPO}:q8_0\n"
    assert "is empty" in runner.invoke(main, ["list"]).output
    gone = runner.invoke(main, ["rm", CKPT_REPO])
    assert gone.exit_code == 1 and "is not in the model store" in gone.output


def test_run_of_a_missing_name_asks_on_a_terminal(fake_hub, monkeypatch):
    monkeypatch.setattr("qwen35.cli._on_terminal", lambda: True)
    declined = CliRunner().invoke(main, ["info", f"{CKPT_REPO}:q8_0"], input="n\n")
    assert declined.exit_code == 1 and "download and convert it now? [Y/n]" in declined.output
    assert "pass --yes to pull it now" in declined.output and fake_hub.requests == []
    accepted = CliRunner().invoke(main, ["info", f"{CKPT_REPO}:q8_0"], input="y\n")
    assert accepted.exit_code == 0 and "architecture   qwen35" in accepted.output, accepted.output


def test_the_store_is_under_xdg_data_home_unless_qwen35_models_moves_it(monkeypatch, tmp_path):
    monkeypatch.delenv("QWEN35_MODELS", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert store.models_dir() == tmp_path / "data" / "qwen35" / "models"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store.models_dir() == tmp_path / "home" / ".local" / "share" / "qwen35" / "models"
    monkeypatch.setenv("QWEN35_MODELS", str(tmp_path / "elsewhere"))
    assert store.models_dir() == tmp_path / "elsewhere"


def test_convert_takes_a_repo_id(fake_hub, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(main, ["convert", f"{CKPT_REPO}:q8_0", "-o", f"{out}/"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["Qwen3.5-Tiny-Q8_0.gguf", "Qwen3.5-Tiny-mmproj-F16.gguf"]


def test_an_existing_path_is_never_taken_for_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen").mkdir()
    (tmp_path / "Qwen" / "Qwen3.5-4B").write_bytes(b"GGUF")
    assert store.resolve("Qwen/Qwen3.5-4B") == ("Qwen/Qwen3.5-4B", None)
