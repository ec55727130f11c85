"""Simplified Chinese (zh-CN): the catalogue covers every command string and every sentence and label the
code sends, keeps each sentence's parts, and a zh-CN member or server reads Chinese cards, modals, job
messages and results while everyone else reads English."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import cast

import discord
from discord import app_commands
from PIL import Image

from i2p2i_bot.app import EXTENSIONS, I2P2IBot
from i2p2i_bot.cards import status_text
from i2p2i_bot.config import Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.guides import GuideError, not_offered
from i2p2i_bot.i18n import catalogue, placeholders, tr, translate
from i2p2i_bot.jobs import Job, JobStatus, Position
from i2p2i_bot.loras import misfit_sentence
from i2p2i_bot.prompt_edits import ReplyError
from i2p2i_bot.replies import USER_ERRORS
from i2p2i_bot.request import GenerationRequest
from i2p2i_bot.runner import GPU_FAULT_REASON
from i2p2i_bot.server_settings import SettingError
from tests.bot_harness import bot_settings, png_bytes, running_i2p2i
from tests.discord_fake import FakeDiscord, StoredMessage
from tests.test_bot import button, ephemeral_answer, gpu_blocked

ZH = catalogue("zh-CN")
# Choice names that are values, not words: setting keys, aspect ratios, "all".
_CODE_LIKE = re.compile(r"[a-z_0-9:]+")


async def command_strings() -> set[str]:
    """Every description, parameter description and choice name of the bot's commands, and the menu's name."""
    bot = I2P2IBot(Settings())
    try:
        for name in EXTENSIONS:
            await bot.load_extension(name)
        found = set()
        for command in bot.tree.walk_commands():
            found.add(command.description)
            if isinstance(command, app_commands.Command):
                for parameter in command.parameters:
                    found.add(parameter.description)
                    found.update(c.name for c in parameter.choices if not _CODE_LIKE.fullmatch(c.name))
        found.update(m.name for m in bot.tree.get_commands(type=discord.AppCommandType.message))
        return {s for s in found if s and s != "…"}
    finally:
        await bot.close()


async def test_every_command_string_has_its_chinese_and_no_entry_is_stale() -> None:
    assert ZH is not None
    strings = await command_strings()
    assert strings - set(ZH.commands) == set()
    assert set(ZH.commands) - strings == set()
    assert all(text.strip() for text in ZH.commands.values())


def test_every_sentence_keeps_its_parts() -> None:
    """A translation names exactly the placeholders of its English sentence, so nothing is lost."""
    assert ZH is not None and len(ZH.messages) >= 30
    for english, chinese in ZH.messages.items():
        assert placeholders(english) == placeholders(chinese), english


def test_finished_sentences_are_matched_to_their_templates() -> None:
    assert translate("Steps must be between 1 and 100 (got 120).", "zh-CN") == (
        "步数必须在 1 到 100 之间（收到 120）。"
    )
    assert translate("There is no job #42.", "zh-CN") == "没有任务 #42。"
    assert translate("Steps must be between 1 and 100 (got 120).", "en-US") == (
        "Steps must be between 1 and 100 (got 120)."
    )
    # Without an entry a sentence stays English rather than being lost.
    assert translate("A sentence nobody translated.", "zh-CN") == "A sentence nobody translated."


async def test_a_zh_cn_member_reads_chinese_and_the_commands_carry_it(
    discord_server: FakeDiscord, base_settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    server = discord_server
    settings = bot_settings(base_settings, tmp_path / "data", server)
    async with running_i2p2i(settings, server, engine):
        imagine = next(c for c in server.synced_commands() if c["name"] == "imagine")
        assert imagine["description_localizations"]["zh-CN"] == "用你写的提示词生成图片"
        assert imagine["name"] == "imagine" and not imagine.get("name_localizations")
        menu = next(c for c in server.synced_commands() if c["name"] == "Imagine from image")
        assert menu["name_localizations"]["zh-CN"] == "用这张图片创作"

        chinese = await server.push_slash("imagine", {"prompt": "a kite", "count": 9}, locale="zh-CN")
        assert await ephemeral_answer(chinese) == "图片数量必须在 1 到 8 之间（收到 9）。"
        english = await server.push_slash("imagine", {"prompt": "a kite", "count": 9}, locale="en-GB")
        assert await ephemeral_answer(english) == "The number of images must be between 1 and 8 (got 9)."


# Latin letters: an English word left inside a Chinese sentence.
_ENGLISH = re.compile(r"[A-Za-z]{2,}")


async def test_limits_and_bounds_read_as_whole_chinese_sentences(
    discord_server: FakeDiscord, base_settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    """The queue's cap and a /settings bound name their numbers and bound in Chinese too: no "2 jobs" or
    "(the most steps here)" left in English inside the sentence."""
    server = discord_server
    settings = bot_settings(base_settings, tmp_path / "data", server, max_queued_jobs_per_user=2)
    top = settings.generate.max_steps
    async with running_i2p2i(settings, server, engine) as bot:
        with gpu_blocked(bot):
            for prompt in ("a red kite", "a blue kite"):
                queued = await server.push_slash("imagine", {"prompt": prompt, "count": 1})
                await queued.wait_followup(timeout_s=30)
            refused = await server.push_slash("imagine", {"prompt": "a kite", "count": 1}, locale="zh-CN")
            said = await ephemeral_answer(refused)
            assert said == "你已有 2 个任务在排队，已达上限；请等待其中一个完成或取消一个。"
            assert not _ENGLISH.search(said)
            english = await server.push_slash("imagine", {"prompt": "a kite", "count": 1}, locale="en-US")
            assert await ephemeral_answer(english) == (
                "You already have 2 jobs queued, the most allowed; wait for one to finish or cancel one."
            )

        options = {"key": "steps", "value": "999"}
        bound = await server.push_slash("settings set", options, user="owner", locale="zh-CN")
        said = await ephemeral_answer(bound)
        assert said == f"步数必须在 1 到 {top} 之间，{top} 即本服务器的步数上限（收到 999）。"
        assert not _ENGLISH.search(said)
        bound = await server.push_slash("settings set", options, user="owner", locale="en-US")
        assert await ephemeral_answer(bound) == (
            f"Steps must be between 1 and {top}, which is the most steps here (got 999)."
        )
        options = {"key": "max_count", "value": "64"}
        wider = await server.push_slash("settings set", options, user="owner", locale="zh-CN")
        high = settings.generate.max_count
        assert await ephemeral_answer(wider) == f"图片数量上限必须在 1 到 {high} 之间（收到 64）。"
        assert await bot.store.server_settings() == []


def test_a_delivery_failure_and_a_held_job_read_in_chinese() -> None:
    """Reasons joined into one sentence, and the GPU's reason in a paused job's line, are translated piece
    by piece; words of the member's own are never split into pieces."""
    reasons = "the channel no longer exists and your DMs are closed to me"
    stored = f"{reasons}. It will be tried again <t:1700000000:R>, and when the bot restarts"
    assert translate(f"Could not be posted: {stored}.", "zh-CN") == (
        "无法发布：频道已不存在；你的私信对我关闭了。将于 <t:1700000000:R> 再试，机器人重启时也会再试。"
    )
    job = Job(
        owner_id=1,
        request=GenerationRequest("a kite", count=2),
        id=3,
        status=JobStatus.RUNNING,
        created_at=0.0,
        locale="zh-CN",
    )
    line = status_text(job, None, locale="zh-CN", held=GPU_FAULT_REASON)
    assert line == "⏸️ 任务 #3：生成这些图片时 GPU 出错了；机器人重启后会继续生成。"
    assert not _ENGLISH.search(line.replace("GPU", ""))
    typed = "Steps must be a whole number (you typed “cats and dogs”)."
    assert translate(typed, "zh-CN") == "步数 必须是整数（你输入的是“cats and dogs”）。"


# -- every sentence the code sends is in the catalogue -------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
# What reaches members: the bot's package and its cogs; the command line speaks English to operators.
SENT_FROM = sorted([*(ROOT / "i2p2i_bot").rglob("*.py"), *(ROOT / "cogs").glob("*.py")])
NOT_SENT = {"cli.py"}
# Errors whose sentence a member reads (replies.USER_ERRORS, and those the cogs turn into a Refusal).
MEMBER_ERRORS = {cls.__name__ for cls in (*USER_ERRORS, GuideError, SettingError, ReplyError)}
_NAMED = re.compile(r"\{\w+\}")


def _template(node: ast.expr) -> str | None:
    """A string literal as it reads, or an f-string with each formatted value as "{}"."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(str(part.value) if isinstance(part, ast.Constant) else "{}" for part in node.values)
    return None


def _shape(key: str) -> str:
    return _NAMED.sub("{}", key)


def used_in_code() -> tuple[set[str], set[str]]:
    """The catalogue keys the code names (tr's and N_'s literals), and the shapes of the sentences it raises
    for members (f-string values as "{}")."""
    keys: set[str] = set()
    raised: set[str] = set()
    for path in SENT_FROM:
        if path.name in NOT_SENT:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            if name == "tr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                keys.add(str(node.args[1].value))
            elif name == "N_" and node.args and isinstance(node.args[0], ast.Constant):
                keys.add(str(node.args[0].value))
            elif name in MEMBER_ERRORS and node.args:
                found = _template(node.args[0])
                # A sentence, not a frame around others ("{}\n{}").
                if found is not None and re.search(r"[A-Za-z]{3}", found):
                    raised.add(found)
    return keys, raised


def unmarked_constants() -> list[str]:
    """Module constants holding text that a member's error is made from without an N_ mark: the walk over
    tr's and N_'s literals would never see them, so their sentences could lack a translation unnoticed."""
    found: list[str] = []
    for path in SENT_FROM:
        if path.name in NOT_SENT:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        plain = set()
        for statement in tree.body:
            target = None
            if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
                target = statement.targets[0]
            elif isinstance(statement, ast.AnnAssign):
                target = statement.target
            value = statement.value if isinstance(statement, ast.Assign | ast.AnnAssign) else None
            if isinstance(target, ast.Name) and value is not None and _template(value) is not None:
                plain.add(target.id)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            if name in MEMBER_ERRORS:
                for arg in node.args:
                    found.extend(
                        f"{path.name}: {n.id}"
                        for n in ast.walk(arg)
                        if isinstance(n, ast.Name) and n.id in plain
                    )
    return sorted(set(found))


def test_sentences_held_in_constants_are_marked_for_the_catalogue() -> None:
    assert unmarked_constants() == []


def test_every_sentence_and_label_the_code_sends_has_its_chinese_and_every_entry_is_used() -> None:
    """tr and N_ name keys the catalogue has; every sentence raised for a member matches one of its
    templates; and no entry is left over from text the code no longer sends."""
    assert ZH is not None
    keys, raised = used_in_code()
    assert len(keys) > 150 and len(raised) > 50  # the walk found the code's text
    assert sorted(k for k in keys if k not in ZH.messages) == []
    shapes = {_shape(k) for k in ZH.messages}
    # The GPU fault's own sentence is for the log: members read GPU_FAULT_MESSAGE instead.
    missing = sorted(t for t in raised if t not in shapes and not t.startswith("the GPU is unusable"))
    assert missing == []
    used = {_shape(k) for k in keys} | raised
    assert sorted(k for k in ZH.messages if _shape(k) not in used) == []


def test_composed_text_is_looked_up_as_written_and_filled_in() -> None:
    job = Job(
        owner_id=1,
        request=GenerationRequest("a kite", count=2),
        id=7,
        status=JobStatus.QUEUED,
        created_at=0.0,
        locale="zh-CN",
    )
    ahead = Position(7, JobStatus.QUEUED, images_ahead=3, images_left=5, eta_s=180.0)
    assert (
        status_text(job, ahead, locale=job.locale)
        == "⏳ 任务 #7 正在排队：前面还有 3 张图片，大约还需 3 分钟。"
    )
    assert (
        status_text(job, ahead, locale="en-US") == "⏳ Job #7 is queued: 3 images ahead, about 3 min to go."
    )
    assert tr("zh-CN", "Use #{k}", k=2) == "使用 #2" and tr(None, "Use #{k}", k=2) == "Use #2"
    # A part that is a sentence of its own is carried over translated.
    assert (
        translate("I could not finish that: this interaction has expired.", "zh-CN")
        == "我无法完成：此交互已过期。"
    )


def labels(message: StoredMessage) -> set[str]:
    found = set()
    for row in message.components:
        for item in row.get("components", ()):
            if "label" in item:
                found.add(item["label"])
            found.update(option["label"] for option in item.get("options", ()))
            if "placeholder" in item:
                found.add(item["placeholder"])
    return found


async def card_for(server: FakeDiscord, image: Image.Image, locale: str) -> StoredMessage:
    """/imagine-from by a member whose Discord is in `locale`; the card it posts."""
    upload = server.add_attachment(png_bytes(image), "photo.png")
    handle = await server.push_slash("imagine-from", {"image": upload, "count": 1}, locale=locale)
    await handle.wait_followup(timeout_s=60)
    return cast(StoredMessage, handle.original)


async def finished(server: FakeDiscord, handle) -> StoredMessage:
    await handle.wait_followup(timeout_s=30)
    await server.wait_until(lambda: cast(StoredMessage, handle.original).attachments or None, timeout_s=30)
    return cast(StoredMessage, handle.original)


async def test_a_zh_cn_server_reads_chinese_cards_jobs_and_results_and_an_english_one_reads_english(
    discord_server: FakeDiscord,
    base_settings: Settings,
    engine: Engine,
    tmp_path: Path,
    astronaut: Image.Image,
) -> None:
    """Public messages follow the server's language, private ones (modals, Info) the member's: a zh-CN
    server and member get a Chinese card, Edit modal, job message, result and Info; in an en-US server the
    same flow reads English as before, while a zh-CN member's own modal there stays Chinese."""
    server = discord_server
    settings = bot_settings(base_settings, tmp_path / "data", server)
    async with running_i2p2i(settings, server, engine) as bot:
        server.guild.preferred_locale = "zh-CN"
        card = await card_for(server, astronaut, "zh-CN")
        assert card.embeds[0]["title"] == "提示词 · best"
        assert {f["name"] for f in card.embeds[0]["fields"]} >= {"CLIP 分数", "反向提示词 · 服务器默认"}
        assert {"生成 ×1", "编辑提示词", "设置", "重新描述…"} <= labels(card)

        edit = await server.push_button(card, button(card, "i2p:card:edit:"), locale="zh-CN")
        await edit.wait_response()
        modal = edit.modal
        assert modal is not None and modal["title"] == "编辑提示词"
        fields = [row["components"][0]["label"] for row in modal["components"]]
        assert fields == ["提示词", "反向提示词", "图片数量（1–8）", "种子（留空则随机）"]
        submit = await server.push_modal_submit(
            edit, {"提示词": "一只风筝", "图片数量（1–8）": "1"}, locale="zh-CN"
        )
        await submit.wait_followup(timeout_s=30)
        queued = submit.followups[0] if submit.followups else submit.original
        assert queued is not None and "任务 #1" in queued.content and "Job" not in queued.content
        result = await finished(server, submit)
        assert result.content.endswith("任务 #1 已完成。")
        embed = result.embeds[0]
        assert embed["title"] == "任务 #1"
        assert "图片（最接近原图的在前）" in {f["name"] for f in embed["fields"]}
        assert " 步 · 引导强度 " in embed["footer"]["text"]
        assert {"重新生成", "编辑并重新生成", "信息", "删除"} <= labels(result)
        job = await bot.store.get_job(1)
        assert job is not None and job.locale == "zh-CN"

        info = await server.push_button(result, "i2p:job:info:1", locale="zh-CN")
        data = (await info.wait_response()).json["data"]
        assert data["embeds"][0]["title"] == "任务 #1 · 已完成"

        server.guild.preferred_locale = "en-US"
        card = await card_for(server, astronaut, "en-US")
        assert card.embeds[0]["title"] == "Prompt · best"
        assert {"Generate ×1", "Edit prompt", "Settings", "Re-describe…"} <= labels(card)
        # The card is the channel's, in English; the modal is the zh-CN member's own.
        edit = await server.push_button(card, button(card, "i2p:card:edit:"), locale="zh-CN")
        await edit.wait_response()
        assert edit.modal is not None and edit.modal["title"] == "编辑提示词"

        press = await server.push_button(card, button(card, "i2p:card:gen:"), locale="en-US")
        result = await finished(server, press)
        assert result.content.endswith("job #2 is done.") and result.embeds[0]["title"] == "Job #2"
        assert {"Reroll", "Edit & regenerate", "Info", "Delete"} <= labels(result)


def test_why_a_guide_is_not_offered_reads_wholly_in_chinese() -> None:
    """The guide's name stays as members type it; what it needs and keeps is translated with the sentence."""
    needs = translate(not_offered("edges", ["edges"]), "zh-CN")
    assert needs == "Edges 需要ControlNet 权重，此机器人尚未下载。"
    off = translate(not_offered("look", []), "zh-CN")
    assert off == "此机器人不提供 look（保留主体外观和风格）：管理员尚未启用。"


def test_a_lora_made_for_another_model_is_refused_wholly_in_chinese() -> None:
    """The refusal and its reason (the family named, or the layers that do not fit) read in Chinese."""
    family = misfit_sentence("xl", tr(None, "it was made for {family}", family="SDXL"))
    assert family == (
        "The LoRA “xl” was made for another model than this server's (it was made for SDXL); choose another."
    )
    assert translate(family, "zh-CN") == (
        "LoRA“xl”是为其他模型制作的，不适用于本服务器的模型（它是为 SDXL 制作的）；请换一个。"
    )
    why = tr(None, "{missing} of its {total} layers have no place in this model", missing=3, total=8)
    assert translate(misfit_sentence("wide", why), "zh-CN") == (
        "LoRA“wide”是为其他模型制作的，不适用于本服务器的模型（它的 8 个层中有 3 个在此模型中没有对应位置）；"
        "请换一个。"
    )
