import torch


def test_tiny_model_fixture_builds_a_real_llama(tiny_model):
    model, tok, handle = tiny_model
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()
