"""Token ids every tokenizer of the project shares; models and data read them from here."""

PAD, START, UNK = "<pad>", "<start>", "<unk>"
PAD_ID, START_ID, UNK_ID = 0, 1, 2
