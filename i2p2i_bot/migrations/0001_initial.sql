-- The first schema: interrogations (with their cache), generation jobs and their images.
-- Times are Unix seconds (REAL). Discord ids are INTEGER (they fit in 64 bits).
-- Job and interrogation ids appear in buttons that outlive restarts, so they are AUTOINCREMENT: an id deleted
-- by /forget is never handed to someone else's row.

-- One row per distinct (image bytes, mode, models): the interrogation cache. The CLIP image embedding is
-- kept as little-endian float32 so later jobs can score their results for fidelity to the source.
CREATE TABLE interrogation_results (
    id              INTEGER PRIMARY KEY,
    source_sha256   TEXT    NOT NULL,
    mode            TEXT    NOT NULL,
    models          TEXT    NOT NULL,  -- canonical JSON object: role -> model id
    prompt          TEXT    NOT NULL,
    score           REAL    NOT NULL,
    caption         TEXT    NOT NULL,
    negative        TEXT,
    candidates      TEXT    NOT NULL,  -- JSON list of [mode, prompt, score]
    image_embedding BLOB    NOT NULL,
    timings         TEXT    NOT NULL,  -- JSON object: stage -> seconds
    created_at      REAL    NOT NULL,
    UNIQUE (source_sha256, mode, models)
);

-- One row per request, so every member keeps their own history even when the result came from the cache.
CREATE TABLE interrogations (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    result_id  INTEGER NOT NULL REFERENCES interrogation_results (id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL,
    guild_id   INTEGER,
    channel_id INTEGER,
    cached     INTEGER NOT NULL CHECK (cached IN (0, 1)),
    created_at REAL    NOT NULL
);
CREATE INDEX interrogations_user ON interrogations (user_id, id);
CREATE INDEX interrogations_result ON interrogations (result_id);

CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    owner_id         INTEGER NOT NULL,
    guild_id         INTEGER,
    channel_id       INTEGER,
    origin           TEXT    NOT NULL,
    request_key      TEXT    UNIQUE,  -- makes submitting the same request twice harmless
    parent_job_id    INTEGER REFERENCES jobs (id) ON DELETE SET NULL,
    interrogation_id INTEGER REFERENCES interrogations (id) ON DELETE SET NULL,
    source_sha256    TEXT,
    prompt           TEXT    NOT NULL,
    negative_prompt  TEXT    NOT NULL,
    count            INTEGER NOT NULL CHECK (count >= 1),
    seeds            TEXT    NOT NULL,  -- JSON list, one seed per image
    model            TEXT    NOT NULL,
    steps            INTEGER NOT NULL,
    guidance         REAL    NOT NULL,
    width            INTEGER NOT NULL,
    height           INTEGER NOT NULL,
    scheduler        TEXT    NOT NULL,
    status           TEXT    NOT NULL
        CHECK (status IN ('queued', 'running', 'complete', 'failed', 'cancelled')),
    attempts         INTEGER NOT NULL DEFAULT 0,  -- failed or interrupted tries so far
    in_flight        INTEGER NOT NULL DEFAULT 0 CHECK (in_flight IN (0, 1)),  -- has images on the GPU now
    error            TEXT,
    created_at       REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    delivery_channel_id    INTEGER,
    delivery_message_id    INTEGER,
    interaction_token      TEXT,
    interaction_expires_at REAL,
    delivered_at           REAL
);
CREATE INDEX jobs_owner ON jobs (owner_id, id);
CREATE INDEX jobs_active ON jobs (status, id) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_undelivered ON jobs (id)
    WHERE delivered_at IS NULL AND status IN ('complete', 'failed', 'cancelled');

CREATE TABLE images (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    image_index INTEGER NOT NULL CHECK (image_index >= 0),
    seed        INTEGER NOT NULL,
    nsfw        INTEGER NOT NULL CHECK (nsfw IN (0, 1)),
    fidelity    REAL,
    sha256      TEXT    NOT NULL,
    created_at  REAL    NOT NULL,
    UNIQUE (job_id, image_index)
);
