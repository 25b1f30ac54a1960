"""HIM: working memory, reasoning buffer, fast/slow FFN paths (model.him)."""
