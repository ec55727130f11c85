-- What a server's admins changed with /settings over the config file's defaults and bounds (see
-- i2p2i_bot/server_settings.py). No row: the server has the config file's settings.
CREATE TABLE server_settings (
    guild_id   INTEGER PRIMARY KEY,
    -- The changed settings as a JSON object; keys a later version does not know are ignored.
    settings   TEXT    NOT NULL,
    updated_by INTEGER NOT NULL,
    updated_at REAL    NOT NULL
);
