-- The sampling settings a member chose for a card's images (/imagine-from's options, or the card's Settings
-- button); NULL: the server's default at the time the images are asked for.
ALTER TABLE cards ADD COLUMN steps INTEGER;
ALTER TABLE cards ADD COLUMN guidance REAL;
-- An aspect ratio such as "3:2", mapped to the model's size when the images are asked for.
ALTER TABLE cards ADD COLUMN aspect TEXT;
ALTER TABLE cards ADD COLUMN scheduler TEXT;
