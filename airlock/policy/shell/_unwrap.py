"""Wrappers and the code that commands run: what unwrapping adds to the walk.

``sudo``, ``env``, ``xargs``, ``find -exec`` ... run the command in their arguments: it becomes
a command of its own. ``bash -c``, ``eval``, ``trap``, ``ssh``, here-documents and literal
scripts piped into a shell run a string: it is queued as a job, parsed like the line itself.
After each job, the decode-to-shell check: code that a decoder or a downloader produces and
a shell, an interpreter or ``source`` runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from airlock.policy.shell._catalog import _COMMANDS, _WRAPPERS, _interpreter, _Wrapper
from airlock.policy.shell._classify import _parse
from airlock.policy.shell._draft import (
    DECODE_TO_SHELL,
    DYNAMIC_COMMAND_NAME,
    DYNAMIC_EVAL,
    DYNAMIC_SHELL_STRING,
    PARSE_TOO_DEEP,
    _Cmd,
    _Draft,
    _Job,
    _short,
)
from airlock.policy.shell._words import _ansi_c, _Word

# Wrapper chains (sudo env nice ... cmd) may be this many times max_depth long.
_WRAPPER_CHAIN_FACTOR: Final = 4
_ASSIGNMENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=", re.ASCII)


class _Unwrapper(_Draft):
    """Unwrapping a command just found, finishing it, and the checks after each job."""

    # -- wrappers --------------------------------------------------------------------------

    def unwrap(self, first: _Cmd) -> None:
        todo = [first]
        limit = len(first.wrappers) + _WRAPPER_CHAIN_FACTOR * self.max_depth
        while todo:
            cmd = todo.pop()
            if len(cmd.wrappers) >= limit:
                self.finding_at(
                    PARSE_TOO_DEEP,
                    f"More than {limit - len(first.wrappers)} wrappers (sudo, env, ...) are "
                    "chained; the innermost commands were not analysed.",
                    cmd.job,
                    cmd.nspan,
                )
                self.finish(cmd)
                continue
            try:
                inner = self.unwrap_one(cmd)
            finally:  # finished even when the budget runs out: it is in the model already
                self.finish(cmd)
            for child in inner:
                self.add(child)
                todo.append(child)

    def wrapper_for(self, cmd: _Cmd) -> tuple[_Wrapper, int] | None:
        if not cmd.words or cmd.dynamic:
            return None
        specs = _WRAPPERS.get(cmd.name)
        if not specs:
            return None
        for spec in specs:
            if spec.subcommand is None:
                return spec, 1
            i = 1
            words = cmd.words
            while i < len(words):
                value = words[i].value
                if value.startswith("-") and len(value) > 1:
                    if value in spec.prefix_options_with_value:
                        i += 1
                    i += 1
                    continue
                if value == spec.subcommand:
                    return spec, i + 1
                break
        return None

    def unwrap_one(self, cmd: _Cmd) -> list[_Cmd]:
        found = self.wrapper_for(cmd)
        if found is None:
            self.note_interpreter(cmd)
            return []
        spec, start = found
        if spec.kind == "shell":
            self.shell(cmd, spec, start)
            return []
        if spec.kind == "eval":
            self.eval(cmd)
            return []
        if spec.kind == "trap":
            self.trap(cmd)
            return []
        if spec.kind == "find":
            return self.find(cmd)
        return self.argv_wrapper(cmd, spec, start)

    def inner(
        self,
        cmd: _Cmd,
        words: list[_Word],
        label: str,
        extra_assignments: Sequence[tuple[str, str]] = (),
        background: bool = False,
        dynamic_args: bool = False,
    ) -> _Cmd:
        return _Cmd(
            words=words,
            assignments=[*cmd.assignments, *extra_assignments],
            redirects=list(cmd.redirects),
            wrappers=(*cmd.wrappers, label),
            job=cmd.job,
            nspan=(words[0].start, words[-1].end),
            pid=cmd.pid,
            pos=cmd.pos,
            background=cmd.background or background,
            depth=cmd.depth,
            dynamic_args_extra=cmd.dynamic_args_extra or dynamic_args,
        )

    def argv_wrapper(self, cmd: _Cmd, spec: _Wrapper, start: int) -> list[_Cmd]:
        words = cmd.words
        n = len(words)
        i = start
        skip = spec.skip_positionals
        ended = False
        seen: set[str] = set()
        assignments: list[tuple[str, str]] = []
        strings: list[tuple[str, _Word, str]] = []
        inner_start: int | None = None
        if spec.compound_start is not None and i < n:
            if words[i].value == spec.compound_start:
                i += 1
            elif spec.compound_name and i + 1 < n and words[i + 1].value == spec.compound_start:
                i += 2
        while i < n:
            value = words[i].value
            is_option = not ended and len(value) > 1 and value[0] == "-" and not words[i].dynamic
            if is_option and value == "--":
                ended = True
                i += 1
                if spec.command_after == "--":
                    inner_start = i
                    break
                continue
            if is_option:
                if value.startswith("--"):
                    opt, eq, attached = value.partition("=")
                    seen.add(opt)
                    takes = opt in spec.options_with_value or opt in spec.string_options
                    if takes and not eq and i + 1 < n:
                        if opt in spec.string_options:
                            strings.append((opt, words[i + 1], words[i + 1].value))
                        i += 1
                    elif opt in spec.string_options and eq:
                        strings.append((opt, words[i], attached))
                    i += 1
                    continue
                for j in range(1, len(value)):
                    opt = "-" + value[j]
                    seen.add(opt)
                    if opt in spec.options_with_value or opt in spec.string_options:
                        attached_value = value[j + 1 :]
                        if attached_value:
                            if opt in spec.string_options:
                                strings.append((opt, words[i], attached_value))
                        elif i + 1 < n:
                            if opt in spec.string_options:
                                strings.append((opt, words[i + 1], words[i + 1].value))
                            i += 1
                        break
                i += 1
                continue
            if spec.assignments and not ended and _ASSIGNMENT_RE.match(value):
                name, _, val = value.partition("=")
                assignments.append((name, val))
                i += 1
                continue
            runs_argv = spec.argv and (not spec.argv_only_with or seen & spec.argv_only_with)
            if skip > 0 or not runs_argv:  # a wrapper's own positional (su USER)
                skip -= 1
                i += 1
                continue
            inner_start = i
            break
        cmd.own_end = inner_start if inner_start is not None else n
        if seen & spec.no_command_options:
            return []
        for opt, word, text in strings:
            cmd.is_wrapper = True
            label = f"{cmd.name} {opt}"
            if word.dynamic:
                self.dynamic_string(cmd, word, label)
            self.decode_checks.append((cmd, word, label))
            self.queue(cmd, text, (word.start, word.end), label, label)
        if inner_start is None or inner_start >= n:
            return []
        cmd.is_wrapper = True
        rest = words[inner_start:]
        if spec.join_rest and not (seen & spec.argv_options):
            text = " ".join(w.value for w in rest)
            span = (rest[0].start, rest[-1].end)
            if any(w.dynamic for w in rest):
                self.finding_at(
                    DYNAMIC_SHELL_STRING,
                    f"`{spec.label}` runs a command line built at run time, so what it runs "
                    "cannot be known before it runs.",
                    cmd.job,
                    span,
                )
            self.queue(cmd, text, span, spec.label, spec.label)
            return []
        return [
            self.inner(
                cmd,
                list(rest),
                spec.label,
                assignments,
                background=spec.background,
                dynamic_args=spec.dynamic_args,
            )
        ]

    def find(self, cmd: _Cmd) -> list[_Cmd]:
        out: list[_Cmd] = []
        words = cmd.words
        excluded: list[tuple[int, int]] = []
        i = 1
        while i < len(words):
            opt = words[i].value
            if opt in ("-exec", "-execdir", "-ok", "-okdir"):
                j = i + 1
                while j < len(words) and words[j].value not in (";", "+"):
                    j += 1
                if j > i + 1:
                    out.append(
                        self.inner(cmd, list(words[i + 1 : j]), f"find {opt}", dynamic_args=True)
                    )
                excluded.append((i + 1, j + 1))
                i = j + 1
                continue
            i += 1
        cmd.excluded = tuple(excluded)
        return out

    def dynamic_string(self, cmd: _Cmd, word: _Word, label: str) -> None:
        self.finding_at(
            DYNAMIC_SHELL_STRING,
            f"`{label}` runs a string built at run time ({_short(word.value)}), so what it "
            "runs cannot be known before it runs.",
            cmd.job,
            (word.start, word.end),
        )

    def shell(self, cmd: _Cmd, spec: _Wrapper, start: int) -> None:
        words = cmd.words
        i = start
        c_mode = s_mode = False
        while i < len(words):
            value = words[i].value
            if value in ("--", "-"):
                i += 1
                break
            if len(value) < 2 or value[0] not in "-+" or words[i].dynamic:
                break
            if value.startswith("--"):
                if value in spec.options_with_value:
                    i += 1
                i += 1
                continue
            letters = value[1:]
            c_mode = c_mode or "c" in letters
            s_mode = s_mode or "s" in letters
            if letters[-1:] in ("o", "O") and i + 1 < len(words):
                i += 1
            i += 1
        cmd.own_end = len(words)
        positional = words[i] if i < len(words) else None
        if c_mode:
            if positional is None:
                return
            cmd.is_wrapper = True
            label = f"{cmd.name} -c"
            if positional.dynamic:
                self.dynamic_string(cmd, positional, label)
            self.decode_checks.append((cmd, positional, label))
            self.queue(cmd, positional.value, (positional.start, positional.end), label, label)
            return
        if positional is not None and not s_mode and positional.value not in ("-", "/dev/stdin"):
            self.decode_checks.append((cmd, positional, cmd.name))  # bash <(curl ...)
            return
        cmd.reads_stdin = True
        self.feed_from_redirects(cmd)

    def feed_from_redirects(self, cmd: _Cmd) -> None:
        """A shell reading its script from a here-document or here-string: parse it."""
        for red in cmd.redirects:
            if red.heredoc:
                cmd.is_wrapper = True
                if red.body_dynamic:
                    self.finding_at(
                        DYNAMIC_SHELL_STRING,
                        f"`{cmd.name}` runs a here-document with expansions in it, so what it "
                        "runs cannot be known before it runs.",
                        cmd.job,
                        red.body_span,
                    )
                self.queue(cmd, red.body, red.body_span, cmd.name, "here-documents")
            elif red.op == "<<<" and red.word is not None:
                cmd.is_wrapper = True
                if red.word.dynamic:
                    self.dynamic_string(cmd, red.word, cmd.name)
                self.decode_checks.append((cmd, red.word, cmd.name))
                self.queue(cmd, red.word.value, (red.word.start, red.word.end), cmd.name, "<<<")
            elif red.op == "<" and red.word is not None and red.word.procsub:
                self.decode_checks.append((cmd, red.word, cmd.name))

    def note_interpreter(self, cmd: _Cmd) -> None:
        """Interpreters and `source`: where their program comes from (for decode-to-shell)."""
        name = cmd.name
        if cmd.dynamic or not cmd.words:
            return
        if name in ("source", "."):
            if len(cmd.words) > 1:
                self.decode_checks.append((cmd, cmd.words[1], name))
            return
        interp = _interpreter(name)
        if interp is None:
            return
        words = cmd.words
        i = 1
        while i < len(words):
            value = words[i].value
            if value == "-" or len(value) < 2 or value[0] != "-":
                break
            opt = value.split("=", 1)[0]
            if opt in interp.code_options or value[:2] in interp.code_options:
                code = words[i + 1] if value == opt and i + 1 < len(words) else words[i]
                self.decode_checks.append((cmd, code, name))
                return
            if opt in interp.stdin_off or value[:2] in interp.stdin_off:
                return
            i += 1
        if i < len(words) and words[i].value not in ("-", "/dev/stdin"):
            self.decode_checks.append((cmd, words[i], name))
            return
        cmd.reads_stdin = True
        for red in cmd.redirects:
            if red.word is not None and (red.op == "<<<" or (red.op == "<" and red.word.procsub)):
                self.decode_checks.append((cmd, red.word, name))

    def eval(self, cmd: _Cmd) -> None:
        cmd.own_end = len(cmd.words)
        args = cmd.words[1:]
        if not args:
            return
        cmd.is_wrapper = True
        span = (args[0].start, args[-1].end)
        text = " ".join(w.value for w in args)
        if any(w.dynamic or w.procsub for w in args):
            self.finding_at(
                DYNAMIC_EVAL,
                f"eval runs a string built at run time ({_short(text)}), so what it runs "
                "cannot be known before it runs.",
                cmd.job,
                span,
            )
        for w in args:
            self.decode_checks.append((cmd, w, "eval"))
        self.queue(cmd, text, span, "eval", "eval")

    def trap(self, cmd: _Cmd) -> None:
        cmd.own_end = len(cmd.words)
        args = cmd.words[1:]
        if len(args) < 2 or args[0].value.startswith("-") or not args[0].value.strip():
            return
        action = args[0]
        if action.dynamic:
            self.dynamic_string(cmd, action, "trap")
        self.decode_checks.append((cmd, action, "trap"))
        self.queue(cmd, action.value, (action.start, action.end), "trap", "trap")

    def finish(self, cmd: _Cmd) -> None:
        """Flags and positionals of the command's own arguments; dynamic name finding."""
        spec = self.catalog.lookup(cmd.name) if cmd.words and not cmd.dynamic else None
        parsed = _parse(spec or _COMMANDS.default, cmd.own_args())
        cmd.parsed = parsed
        cmd.flags = parsed.flags
        cmd.positionals = parsed.positionals
        cmd.option_values = parsed.option_values
        cmd.dynamic_args = cmd.dynamic_args_extra or any(
            w.dynamic or w.brace for w in cmd.words[1:]
        )
        if cmd.dynamic:
            self.finding_at(
                DYNAMIC_COMMAND_NAME,
                f"The name of the command to run ({_short(cmd.argv0)}) is computed at run "
                "time, so what it runs cannot be known before it runs.",
                cmd.job,
                cmd.nspan,
            )
            self.decode_checks.append((cmd, cmd.words[0], "the command name"))

    # -- after each job: decode-to-shell and literal feeds into shells ----------------------

    def after_job(self, job: _Job, first_pipe: int, first_check: int, first_cmd: int) -> None:
        producers = [
            c
            for c in self.commands[first_cmd:]
            if c.job is job and (self.is_decoder(c) or c.name in _COMMANDS.downloaders)
        ]
        for cmd, word, label in self.decode_checks[first_check:]:
            if cmd.job is not job:
                continue
            self.budget.charge(len(producers))
            for other in producers:
                if other is not cmd and word.start <= other.nspan[0] and other.nspan[1] <= word.end:
                    self.finding_at(
                        DECODE_TO_SHELL,
                        f"`{label}` runs code produced by `{other.name}` "
                        f"({_short(word.value)}): downloaded or decoded code is hidden from "
                        "review.",
                        job,
                        cmd.nspan,
                    )
                    break
        for pid in range(first_pipe, len(self.pipes)):
            members = sorted(self.pipes[pid], key=lambda c: c.pos)
            if not any(m.reads_stdin for m in members):
                continue
            at: dict[int, list[_Cmd]] = {}
            for m in members:
                at.setdefault(m.pos, []).append(m)
            span = (min(m.nspan[0] for m in members), max(m.nspan[1] for m in members))
            decoder: _Cmd | None = None  # the first decoder before the current position
            for pos in sorted(at):
                cmds = at[pos]
                for cmd in cmds:
                    if not cmd.reads_stdin:
                        continue
                    if decoder is not None:
                        self.finding_at(
                            DECODE_TO_SHELL,
                            f"`{cmd.name}` runs what `{decoder.name}` decodes: the code that "
                            "runs is hidden from review.",
                            job,
                            span,
                        )
                    if cmd.name in _COMMANDS.shells:
                        self.literal_feed(cmd, at.get(pos - 1, []))
                if decoder is None:
                    decoder = next((m for m in cmds if self.is_decoder(m)), None)

    def is_decoder(self, cmd: _Cmd) -> bool:
        cond = _COMMANDS.decoders.get(cmd.name)
        return cond is not None and cond.holds(cmd.flags, cmd.positionals, cmd.args)

    def literal_feed(self, shell: _Cmd, feeders: Sequence[_Cmd]) -> None:
        """``echo 'rm -rf /' | sh``, ``cat <<EOF | sh``: parse what the shell will read."""
        feeder = next((f for f in reversed(feeders) if not f.is_wrapper), None)
        if feeder is None:
            return
        text: str | None = None
        dynamic = False
        span = feeder.nspan
        args = feeder.words[1:]
        if feeder.name == "echo":
            interpret = False
            while args and re.fullmatch(r"-[neE]+", args[0].value):
                interpret = interpret or "e" in args[0].value
                args = args[1:]
            text = " ".join(w.value for w in args)
            text = _ansi_c(text) if interpret else text
            dynamic = any(w.dynamic for w in args)
        elif feeder.name == "printf" and args:
            fmt = args[0].value
            if "%" not in fmt:
                text, dynamic = _ansi_c(fmt), args[0].dynamic
            elif fmt in ("%s", "%s\\n", "%b", "%b\\n") and len(args) > 1:
                text = " ".join(w.value for w in args[1:])
                text = _ansi_c(text) if fmt.startswith("%b") else text
                dynamic = any(w.dynamic for w in args[1:])
        elif feeder.name == "cat" and not feeder.positionals:
            for red in feeder.redirects:
                if red.heredoc:
                    text, dynamic, span = red.body, red.body_dynamic, red.body_span
                elif red.op == "<<<" and red.word is not None:
                    text, dynamic = red.word.value, red.word.dynamic
                    span = (red.word.start, red.word.end)
        if text is None:
            return
        shell.is_wrapper = True
        if dynamic:
            self.finding_at(
                DYNAMIC_SHELL_STRING,
                f"`{shell.name}` reads a script built at run time from `{feeder.name}`, so "
                "what it runs cannot be known before it runs.",
                shell.job,
                span,
            )
        self.queue(shell, text, span, shell.name, "piped scripts")
