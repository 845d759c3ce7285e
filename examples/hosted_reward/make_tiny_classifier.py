"""Write a randomly initialized text classifier with the classes the example recipe names
("disfluent", "fluent"), to try the hosted-reward route before a trained model exists.

    python examples/hosted_reward/make_tiny_classifier.py models/fluency-classifier

A real reward model is written the same way: model.save_pretrained(dir); tokenizer.save_pretrained(dir).
"""
from __future__ import annotations

import string
import sys
from pathlib import Path


def make_tiny_classifier(out_dir: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A character vocabulary (word-initial and "##" word-internal pieces): no tokenizer to download,
    # and every transcript still tokenizes, letter by letter.
    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(out / "vocab.txt"))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512,
                        initializer_range=0.5,  # wide weights: a random model whose scores still differ
                        id2label={0: "disfluent", 1: "fluent"}, label2id={"disfluent": 0, "fluent": 1})
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    print(make_tiny_classifier(sys.argv[1] if len(sys.argv) > 1 else "models/fluency-classifier"))
