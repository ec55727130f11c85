-- What a member chose on a prompt card, beside the card itself (a card is an interrogation request), so its
-- buttons mean the same after a restart. No row: the card as it was first posted.
CREATE TABLE cards (
    interrogation_id INTEGER PRIMARY KEY REFERENCES interrogations (id) ON DELETE CASCADE,
    -- The applied negative suggestion, which Generate, Use #k and Edit prompt use; NULL: the server's default.
    negative_prompt  TEXT,
    -- Whether the card lists every prompt it offers (More prompts), not just the first.
    all_prompts      INTEGER NOT NULL DEFAULT 0 CHECK (all_prompts IN (0, 1)),
    updated_at       REAL    NOT NULL
);
