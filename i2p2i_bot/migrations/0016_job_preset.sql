-- The model preset ([[models.presets]]) a job's images are made with, so Info and Reroll name it after a
-- restart and after config edits; jobs.model keeps the generator it named. Every job made before presets
-- came from models.generator, which the built-in preset sd-v1-4 names.
ALTER TABLE jobs ADD COLUMN preset TEXT NOT NULL DEFAULT 'sd-v1-4';
-- The preset a card was made for (its CLIP described the image); NULL: the bot's default preset.
ALTER TABLE cards ADD COLUMN preset TEXT;
