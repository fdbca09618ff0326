"""`lmpipe inspect`'s JSON API (FastAPI TestClient) on a hand-made catalog: a few documents, per-token columns,
latents; byte-level pieces; bad input answered with one line, never a stack trace."""

import duckdb
import pytest
from fastapi.testclient import TestClient

from flows.inspector.app import create_app
from flows.inspector.data import RunData
from flows.inspector.pieces import TokenPieces
from stages.corpus.tokenizers import train_bpe
from storage.catalog import Catalog

TEXTS = ["the union is strong. ", "les élèves — 日本 ok"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["the union is strong and the people are free"] * 5, 300)


def catalog(tokenizer) -> Catalog:
    """documents, tokens, token_scores, probe_losses, token_selection, token_concepts, concepts, latents."""
    con = duckdb.connect()
    ids = [tokenizer.encode(text).ids for text in TEXTS]
    token_rows, index = [], 0
    for doc, doc_ids in enumerate(ids):
        for position, token_id in enumerate(doc_ids):
            token_rows.append(("val", index, doc, position, token_id))
            index += 1
    con.execute("CREATE TABLE documents AS SELECT * FROM (VALUES (0, 'val', 'a', ?, ?), (1, 'val', 'b', ?, ?)) "
                "t(doc_id, split, source, num_tokens, text)", [len(ids[0]), TEXTS[0], len(ids[1]), TEXTS[1]])
    con.execute("CREATE TABLE tokens (split VARCHAR, token_index BIGINT, doc_id BIGINT, position INT, token_id INT)")
    con.executemany("INSERT INTO tokens VALUES (?, ?, ?, ?, ?)", token_rows)
    con.execute("CREATE TABLE token_scores AS SELECT split, token_index, doc_id, position, token_id, "
                "token_index / 10 AS ref_loss, 1.0 AS ref_entropy FROM tokens WHERE token_index > 0")
    con.execute("CREATE TABLE probe_losses AS SELECT 'train_target.ntp' AS model, 1 AS step, split, token_index, "
                "(token_index % 5)::FLOAT AS loss FROM tokens WHERE token_index BETWEEN 2 AND 6")
    con.execute("CREATE VIEW target_token_losses AS SELECT p.model, p.split, p.token_index, s.doc_id, "
                "p.loss AS target_loss, s.ref_loss, p.loss - s.ref_loss AS excess_loss FROM probe_losses p "
                "JOIN token_scores s USING (split, token_index)")
    con.execute("CREATE TABLE token_selection AS SELECT 'train_target.slm' AS model, split, token_index, 2 AS "
                "times_seen, (token_index % 3)::INT AS times_selected FROM tokens")
    con.execute("CREATE TABLE token_concepts AS SELECT split, token_index, [token_index % 4, 7] AS concept_ids, "
                "[0.5, 0.1]::FLOAT[] AS attribution FROM tokens WHERE token_index > 0")
    con.execute("CREATE TABLE concepts AS SELECT range::INT AS concept_id, ['tok' || range] AS top_tokens, "
                "range * 2 AS num_labelled FROM range(8)")
    con.execute("CREATE TABLE latent_summary AS SELECT range::INT AS concept_id, 100 AS num_tokens, range AS "
                "num_active, range / 100 AS density, range = 0 AS dead, 1.0 AS max_activation, 0.5 AS "
                "mean_activation, range * 2 AS num_labelled, ['tok' || range] AS top_tokens FROM range(8)")
    con.execute("CREATE TABLE latents AS SELECT concept_id FROM latent_summary")
    con.execute("CREATE TABLE latent_logits AS SELECT 3 AS concept_id, 'promoted' AS direction, 1 AS rank, "
                "token_id, ' union' AS token, 0.7 AS logit FROM tokens LIMIT 1")
    con.execute("CREATE TABLE latent_contexts AS SELECT 3 AS concept_id, 1 AS rank, 'val' AS split, 2 AS "
                "token_index, 0.9 AS activation, 1 AS start_index, [t1.token_id, t2.token_id] AS token_ids, "
                "[0.2, 0.9]::FLOAT[] AS activations, 'union strong' AS text FROM tokens t1, tokens t2 "
                "WHERE t1.token_index = 1 AND t2.token_index = 2")
    return Catalog(con, {}, {}, "")


@pytest.fixture(scope="module")
def client(tokenizer):
    return TestClient(create_app(RunData(catalog(tokenizer), TokenPieces(tokenizer), {"val_loss.png": lambda: b"PNG"})))


def test_pieces_are_the_decoded_text_with_split_characters_on_the_completing_token(tokenizer):
    pieces = TokenPieces(tokenizer)
    ids = tokenizer.encode(TEXTS[1]).ids
    texts = pieces.texts(ids)
    assert "".join(texts) == TEXTS[1] == tokenizer.decode(ids)
    assert len(texts) == len(ids) and "" in texts  # 日 is 3 bytes: 3 tokens in this small vocabulary
    assert "日" in texts and "本" in texts


def test_a_document_carries_its_pieces_and_every_column_aligned_by_token_index(client, tokenizer):
    doc = client.get("/api/document", params={"split": "val", "doc_id": 0}).json()
    first = doc["first_index"]
    assert "".join(doc["text"]) == TEXTS[0] and first == 0
    assert doc["values"]["ref_loss"][:3] == [None, 0.1, 0.2]
    assert doc["values"]["excess_loss:train_target.ntp"][2] == pytest.approx(2 - 0.2)
    assert doc["values"]["selected:train_target.slm"][4] == pytest.approx(0.5)
    # the labels of token_index i+1 belong to the hidden state after token i (as the concept_labels view)
    assert doc["concepts"][0] == [[1, 0.5], [7, pytest.approx(0.1)]] and doc["values"]["concept"][0] == 1
    assert doc["concept_info"]["1"] == ["tok1"]


def test_documents_search_and_rank_by_excess_loss_and_selection(client):
    assert [d["doc_id"] for d in client.get("/api/documents", params={"split": "val", "q": "日本"}).json()] == [1]
    ranked = client.get("/api/documents", params={"split": "val", "order": "excess_desc",
                                                  "model": "train_target.ntp"}).json()
    assert sum(r["tokens"] for r in ranked) == 5 and ranked[0]["value"] >= ranked[-1]["value"]
    assert client.get("/api/documents", params={"split": "val", "q": "'; DROP TABLE tokens; --"}).json() == []
    assert len(client.get("/api/documents", params={"split": "val", "order": "selection_asc",
                                                    "model": "train_target.slm"}).json()) == 2


def test_latents_search_by_context_word_token_or_id_and_one_latent(client):
    assert [r["concept_id"] for r in client.get("/api/latents", params={"q": "strong"}).json()] == [3]
    assert [r["concept_id"] for r in client.get("/api/latents", params={"q": "union"}).json()] == [3]
    assert [r["concept_id"] for r in client.get("/api/latents", params={"q": "5"}).json()] == [5]
    latent = client.get("/api/latent/3").json()
    assert latent["contexts"][0]["doc_id"] == 0
    assert latent["contexts"][0]["activations"] == pytest.approx([0.2, 0.9])
    assert latent["logits"][0]["direction"] == "promoted"


@pytest.mark.parametrize(("path", "params", "status", "says"), [
    ("document", {"split": "val", "doc_id": 42}, 404, "no document 42 in split 'val'"),
    ("document", {"split": "val", "doc_id": "x"}, 400, "bad request: doc_id"),
    ("document", {"split": "val", "doc_id": 0, "column": "excess_loss:nope"}, 400, "no column 'excess_loss:nope'"),
    ("documents", {"split": "val", "order": "excess_desc", "model": "x"}, 400, "no excess data for model 'x'"),
    ("latent/99", {}, 404, "no latent 99: this SAE has 8 latents"),
    ("latents", {"order": "x; DROP"}, 400, "unknown order"),
    ("plot/secret.txt", {}, 404, "no plot 'secret.txt'"),
])
def test_bad_input_is_one_line_not_a_stack_trace(client, path, params, status, says):
    response = client.get(f"/api/{path}", params=params)
    assert response.status_code == status and says in response.json()["error"]


def test_no_finished_run_is_a_message_naming_what_to_run(tokenizer):
    empty = Catalog(duckdb.connect(), {"documents": "nothing is built yet under /r: run `lmpipe run --preset "
                                       "tiny`"}, {}, "")
    client = TestClient(create_app(RunData(empty, None)))
    assert "lmpipe run --preset tiny" in client.get("/api/overview").json()["error"]
    response = client.get("/api/document", params={"split": "val", "doc_id": 0})
    assert response.status_code == 404 and "nothing is built yet" in response.json()["error"]
    assert client.get("/").status_code == 200 and client.get("/api/plot/val_loss.png").status_code == 404
