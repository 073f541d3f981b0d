"""What makes two questions share a cached answer besides their embeddings: exact terms and the settings key."""

from __future__ import annotations

from pgsynapse.answer_cache import exact_terms, may_share, rules_key, settings_key, swapped_roles
from pgsynapse.answerers.extractive import ExtractiveAnswerer
from pgsynapse.config import load_settings


def test_identifiers_numbers_and_sql_verbs_are_exact_terms_case_folded():
    assert exact_terms("What does dblink_connect_u do in dblink?") == {"dblink_connect_u"}
    assert exact_terms("what does DBLINK_CONNECT_U do") == exact_terms("explain dblink_connect_u")
    assert exact_terms("what changed in the 15 release") == {"15"}
    assert exact_terms("ALTER LANGUAGE syntax and options") != exact_terms("DROP LANGUAGE syntax and options")
    # a rewording keeps them: the paraphrase may still be served
    assert exact_terms("how do I roll back to a savepoint") == exact_terms("rolling back to a savepoint, how?") == set()


def test_negations_and_words_of_direction_or_degree_are_exact_terms_by_group():
    assert exact_terms("How do I make a column not nullable?") == {"not"} != exact_terms("make a column nullable")
    assert exact_terms("Why doesn't my query use the index?") == exact_terms("why does my query not use the index")
    assert exact_terms("How do I increase shared_buffers?") == {"shared_buffers", "increase"}
    assert exact_terms("How do I increase shared_buffers?") != exact_terms("How do I decrease shared_buffers?")
    assert exact_terms("Why is my query slow?") != exact_terms("Why is my query fast?")
    assert exact_terms("the largest field size") == exact_terms("the biggest field size") == {"max"}
    assert exact_terms("How do I enable a trigger?") == exact_terms("enabling triggers, how?") == {"enable"}
    assert exact_terms("Why does VACUUM lock a table?") != exact_terms("When does VACUUM lock a table?")
    assert exact_terms("truncate every table") == exact_terms("truncate all the tables") != exact_terms("one table")
    # words common in paraphrases of one question are not terms
    assert exact_terms("a variable with the same type as a column") == exact_terms("a variable with the type of a column")


def test_questions_that_swap_what_to_or_from_mark_or_subject_and_object_are_different_questions():
    assert swapped_roles("How do I cast text to integer?", "How do I cast integer to text?")
    assert swapped_roles("copy data from a table to a file", "copy data from a file into a table")
    assert not may_share("How do I migrate from MySQL to PostgreSQL?", "How do I migrate from PostgreSQL to MySQL?")
    assert swapped_roles("Can a view reference a materialized view?", "Can a materialized view reference a view?")
    # a rewording that keeps the roles, or names another thing, is not a swap
    assert may_share("How do I convert text to an integer?", "in PostgreSQL, how can I convert text into integer")
    assert not swapped_roles("options and syntax of DROP VIEW", "DROP VIEW syntax and options")
    assert not swapped_roles("How do I cast text to integer?", "How do I cast text to bigint?")  # not a swap...
    assert not may_share("cast text to int4", "cast text to int8")  # ...and exact terms tell these apart


def test_every_setting_that_shapes_an_answer_is_in_the_key():
    base = load_settings(environ={})
    keys = {settings_key(base)}
    generator = {"answerer": "transformers", "answerer_model_path": "/m"}
    for change in (generator, {"answer_top_k": 3}, {"hybrid": False},
                   {"hybrid_text_weight": 0.5}, {"hybrid_text_max_rows": 500}, {"not_found_threshold": 0.5},
                   {**generator, "citation_policy": "refuse"}, {**generator, "answer_context_tokens": 512},
                   {"answerer": "llama-cpp", "answerer_model_path": "/m.gguf"},
                   {"answerer": "llama-cpp", "answerer_model_path": "/n.gguf"},
                   # another endpoint serving a model of the same name answers otherwise
                   {"answerer": "openai", "openai_base_url": "http://a.example/v1"},
                   {"answerer": "openai", "openai_base_url": "http://b.example/v1"}):
        keys.add(settings_key(load_settings(environ={}, **change)))
    assert len(keys) == 13
    # the endpoint, a secret setting (a URL may carry a token), is in the stored key only as a hash
    assert "b.example" not in settings_key(load_settings(environ={}, answerer="openai",
                                                         openai_base_url="http://b.example/v1"))
    # settings that shape no answer leave it alone
    assert settings_key(load_settings(environ={}, batch_size=7, answer_cache_threshold=0.95)) == settings_key(base)
    # the fusion's weight and the full-text bound shape nothing when full text is off
    off = load_settings(environ={}, hybrid=False)
    assert settings_key(load_settings(environ={}, hybrid=False, hybrid_text_weight=0.5,
                                      hybrid_text_max_rows=500)) == settings_key(off)


def test_an_answer_of_an_earlier_extractive_answerer_is_not_served(monkeypatch):
    base = load_settings(environ={})
    before = settings_key(base)
    monkeypatch.setattr(ExtractiveAnswerer, "revision", ExtractiveAnswerer.revision + 1)
    assert settings_key(base) != before


def test_the_rules_key_changes_with_any_enabled_rule_and_not_with_their_order():
    a = {"id": 1, "text": "bombs", "action": "block", "threshold": 0.6}
    b = {"id": 2, "text": "vacuum", "action": "flag", "threshold": 0.5}
    assert rules_key([a, b]) == rules_key([b, a]) != rules_key([a])
    assert rules_key([a, {**b, "threshold": 0.55}]) != rules_key([a, b])
