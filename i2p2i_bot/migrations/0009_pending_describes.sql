-- Describes a member is waiting on: deferred ("thinking…"), their card not yet posted. A kill leaves the row
-- behind, and the next start edits the placeholder into a sentence while the interaction's token lives (15
-- minutes), so nobody is left waiting on a describe that will never come. The token is a secret for those 15
-- minutes: the row is deleted as soon as the describe is answered.
CREATE TABLE pending_describes (
    interaction_id INTEGER PRIMARY KEY,
    application_id INTEGER NOT NULL,
    token          TEXT    NOT NULL,
    -- The "thinking…" placeholder the describe answers; NULL when Discord did not say.
    message_id     INTEGER,
    user_id        INTEGER NOT NULL,
    channel_id     INTEGER,
    created_at     REAL    NOT NULL,
    expires_at     REAL    NOT NULL
);
