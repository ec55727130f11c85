-- The prompt a member wrote for a card's images by replying to it (discord.reply_edits); NULL: the card's
-- own described prompt.
ALTER TABLE cards ADD COLUMN prompt TEXT;
