"""The walk over the tree-sitter-bash syntax tree: every simple command, wherever it sits.

Pipelines, lists, subshells, ``$( )``, backticks, process substitution, function, loop and
branch bodies, redirects and here-documents, with an explicit stack (never recursion). Each
job (the line, or a string found in it) is parsed and walked in turn; each command found is
unwrapped (:mod:`._unwrap`) as it is added. Every node visited is charged to the analysis's
budget (:mod:`._budget`), as is every character of model made from it. Also here: the
work-arounds for what tree-sitter-bash gets wrong (docs/decisions.md lists them).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from typing import Final, TypeAlias

import tree_sitter
import tree_sitter_bash

from airlock.policy.shell._budget import _Budget
from airlock.policy.shell._draft import PARSE_ERROR, PARSE_TOO_LARGE, _Cmd, _Job, _Redir, _short
from airlock.policy.shell._unwrap import _Unwrapper
from airlock.policy.shell._words import (
    _EXPANSIONS,
    Node,
    _assignment,
    _dec,
    _group_words,
    _text,
    _Word,
    _word,
    _WordBuilder,
)

_LANGUAGE: Final = tree_sitter.Language(tree_sitter_bash.language())
_local = threading.local()


class _Input:
    """One thread's parser, and the one buffer its read callback ever returns.

    py-tree-sitter (0.26) never releases the object a read callback returns: its wrapper
    takes a buffer view of it and releases that, but keeps the reference from the call. A
    fresh slice per call (bytes or memoryview) is therefore never freed, and a memoryview
    also keeps the whole line alive. So the callback returns ``buffer``, a bytearray made
    once per thread: refilled with ``data[offset:]`` at each call (the wrapper has released
    its view of it by then), emptied after each parse. The references it leaks all point at
    this one object, which lives as long as the thread anyway.
    """

    __slots__ = ("buffer", "data", "deadline", "parser")

    def __init__(self) -> None:
        self.parser = tree_sitter.Parser(_LANGUAGE)
        self.buffer = bytearray()
        self.data = b""
        self.deadline = 0.0

    def read(self, offset: int, _point: tree_sitter.Point) -> bytearray:
        self.buffer[:] = memoryview(self.data)[offset:] if offset else self.data
        return self.buffer

    def progress(self, _offset: int, _has_error: bool) -> bool:
        return time.monotonic() > self.deadline

    def parse(self, data: bytes, deadline: float) -> tree_sitter.Tree | None:
        self.data, self.deadline = data, deadline
        try:
            return self.parser.parse(self.read, progress_callback=self.progress)
        except ValueError:  # cancelled
            self.parser.reset()  # or the next parse would resume this one
            return None
        finally:
            self.data = b""
            self.buffer.clear()


def _parse(data: bytes, deadline: float) -> tree_sitter.Tree | None:
    """Parse, giving up at ``deadline`` (time.monotonic): tree-sitter's error recovery is
    superlinear on some garbage (a few thousand `)` take a second)."""
    state: _Input | None = getattr(_local, "input", None)
    if state is None:
        state = _local.input = _Input()
    return state.parse(data, deadline)


# tree-sitter-bash takes time quadratic in the length of one pipeline (0.25 s for 1,000
# commands, 10 s for 8,000), after its last progress check: no deadline can stop it. Lines
# whose longest pipeline may be longer than this are not parsed.
MAX_PIPELINE: Final = 512
# A rough lexer for that, on bytes: escapes and quoted strings (skipped), the pipe operators
# (`|`, `|&`), and what ends a pipeline (`||`, `;`, `&`, a newline). Quotes it gets wrong
# can only make it count more.
_PIPES_RE: Final = re.compile(rb"""\\.|'[^']*'|"(?:[^"\\]|\\.)*"|\|\||\|&?|[;&\n]""", re.DOTALL)


def _longest_pipeline(data: bytes) -> int:
    """An upper bound of the number of `|` in one pipeline of ``data`` (roughly: in one
    run of the line without a `;`, `&`, `||` or newline outside quotes)."""
    longest = count = 0
    for match in _PIPES_RE.finditer(data):
        token = match.group()
        if token == b"|" or token == b"|&":
            count += 1
            longest = max(longest, count)
        elif token in (b"||", b";", b"&", b"\n"):
            count = 0
    return longest


_REDIRECT_TYPES: Final = frozenset({"file_redirect", "heredoc_redirect", "herestring_redirect"})
_SUBSTITUTIONS: Final = frozenset({"command_substitution", "process_substitution"})
_BACKTICKS_RE: Final = re.compile(r"\\.|`((?:[^`\\]|\\.)*)`", re.DOTALL)  # group 1: `...`

# Redirects inherited from enclosing compound commands, innermost first, as a chain that
# each level extends without copying what the outer levels added (`( ( ls ) >a ) >b`).
Inherited: TypeAlias = "tuple[tuple[_Redir, ...], Inherited] | None"
# The walk's context: (pipeline id or -1, position in it, background, inherited redirects).
Ctx: TypeAlias = tuple[int, int, bool, Inherited]
_NO_CTX: Final[Ctx] = (-1, 0, False, None)


class _Walker(_Unwrapper):
    """Parses each job and walks its tree; what it finds goes into the draft."""

    job: _Job  # the job being walked
    # Redirects of `a && b > f` / `a | b > f`: tree-sitter hangs them on the whole list
    # or pipeline; bash applies them to its last command. Keyed by that command's node.
    pending: dict[tuple[int, int, str], list[Node]]

    # -- jobs ------------------------------------------------------------------------------

    def run(self) -> None:
        self.jobs.append(_Job(self.data, None, 0, (), False))
        index = 0
        while index < len(self.jobs):
            job = self.jobs[index]
            index += 1
            self.walk(job)

    def walk(self, job: _Job) -> None:
        self.bytes_parsed += len(job.data)
        self.job = job
        parse_data = job.data
        if b"<>" in parse_data:  # not in tree-sitter-bash's grammar; >> has the same shape
            parse_data = parse_data.replace(b"<>", b">>")
        if b"\0" in parse_data:
            # bash cannot receive a NUL (execve's strings end there), and tree-sitter's lexer
            # is quadratic on them: parse spaces instead, and fail closed.
            parse_data = parse_data.replace(b"\0", b" ")
            at = job.data.index(b"\0")
            self.finding_at(
                PARSE_ERROR,
                f"The command contains a NUL byte (byte {at}), which bash cannot receive; "
                "it was analysed as if it were a space.",
                job,
                (at, at + 1),
            )
        self.budget.charge(len(parse_data))  # the scan below, and the parse
        if parse_data.count(b"|") > MAX_PIPELINE and _longest_pipeline(parse_data) > MAX_PIPELINE:
            self.finding_at(
                PARSE_TOO_LARGE,
                f"The command has a pipeline of more than {MAX_PIPELINE} commands (the parser "
                "would take too long on it); it was not analysed.",
                job,
                (0, len(job.data)),
            )
            return
        tree = _parse(parse_data, self.deadline)
        if tree is None:
            self.finding_at(
                PARSE_TOO_LARGE,
                f"The command could not be parsed within {self.max_parse_seconds:g} s (it is "
                "too large or too convoluted); it was not analysed.",
                job,
                (0, len(job.data)),
            )
            return
        root = tree.root_node
        if root.has_error:
            self.parse_error(job, root)
        first_pipe = len(self.pipes)
        first_check = len(self.decode_checks)
        first_cmd = len(self.commands)
        ctx0: Ctx = (-1, 0, job.background, None)
        stack: list[tuple[Node, Ctx]] = [(root, ctx0)]
        data = job.data
        self.pending = {}
        charge = self.budget.charge
        while stack:
            node, ctx = stack.pop()
            charge(1)
            t = node.type
            extra: list[Node] = []
            if self.pending:
                extra = self.pending.pop((node.start_byte, node.end_byte, t), [])
            if t == "command":
                self.command(node, ctx, job, extra, node, stack)
                continue
            if t == "redirected_statement":
                self.redirected(node, ctx, job, stack, extra)
                continue
            if extra:
                redirs = tuple(r for red in extra for r in self.redirect(red, data))
                ctx = self.with_redirects(ctx, redirs)
            if t == "pipeline":
                self.pipeline(node, ctx, stack)
                continue
            if t in ("declaration_command", "unset_command"):
                self.declaration(node, ctx, job, stack)
                continue
            if t in ("variable_assignment", "variable_assignments"):
                parent = node.parent
                if parent is None or parent.type != "c_style_for_statement":
                    self.assignment_statement(node, ctx, job, stack)
                    continue
            if t == "heredoc_redirect":
                self.heredoc_children(node, ctx, stack)
                continue
            if t in _SUBSTITUTIONS or t == "function_definition":
                ctx = _NO_CTX
            elif t == "comment":
                continue
            self.push_children(node, ctx, stack)
        self.after_job(job, first_pipe, first_check, first_cmd)

    def with_redirects(self, ctx: Ctx, redirs: tuple[_Redir, ...]) -> Ctx:
        """``ctx`` with more inherited redirects (``( ( ls ) >a ) >b``: ls has both)."""
        if not redirs:
            return ctx
        return (ctx[0], ctx[1], ctx[2], (redirs, ctx[3]))

    def inherited(self, ctx: Ctx) -> list[_Redir]:
        """The redirects ``ctx`` passes down, outermost first (each command gets a copy)."""
        levels: list[tuple[_Redir, ...]] = []
        chain = ctx[3]
        while chain is not None:
            levels.append(chain[0])
            chain = chain[1]
        self.budget.charge(len(levels))
        return [r for level in reversed(levels) for r in level]

    def push_children(self, node: Node, ctx: Ctx, stack: list[tuple[Node, Ctx]]) -> None:
        children = node.children
        count = len(children)
        for i in range(count - 1, -1, -1):
            child = children[i]
            if not child.is_named or child.child_count == 0:
                continue
            if i + 1 < count and children[i + 1].type == "&" and not ctx[2]:
                stack.append((child, (ctx[0], ctx[1], True, ctx[3])))
            else:
                stack.append((child, ctx))

    def parse_error(self, job: _Job, root: Node) -> None:
        found = root
        while True:  # descend to the first ERROR or MISSING node, in document order
            child = next(
                (c for c in found.children if c.is_error or c.is_missing or c.has_error), None
            )
            if child is None:
                break
            found = child
            if child.is_error or child.is_missing:
                break
        where = found.start_byte
        if found.is_missing:
            detail = f"expected `{found.type}`"
        else:
            end = min(found.end_byte, found.start_byte + 160)  # enough for 40 characters
            snippet = _text(job.data, found.start_byte, end)
            snippet = snippet if len(snippet) <= 40 else snippet[:37] + "..."
            detail = f"near `{snippet}`" if snippet.strip() else "at the end of the input"
        inside = " in a nested command line" if job.outer_span is not None else ""
        self.finding_at(
            PARSE_ERROR,
            f"The command has a syntax error{inside} (byte {where}, {detail}); only the parts "
            "that parsed were analysed.",
            job,
            (found.start_byte, found.end_byte),
        )

    def assignment_statement(
        self, node: Node, ctx: Ctx, job: _Job, stack: list[tuple[Node, Ctx]]
    ) -> None:
        """``X=1 Y=2`` alone: a command with no name, only assignments (rules can match them)."""
        if node.type == "variable_assignment":
            nodes = [node]
        else:
            nodes = [c for c in node.named_children if c.type == "variable_assignment"]
        parts = [part for a in nodes for part in a.named_children[1:] if part.child_count]
        stack.extend((part, _NO_CTX) for part in reversed(parts))
        self.statement(node, ctx, job, [], [_assignment(a, job.data, self.budget) for a in nodes])

    # -- structure -------------------------------------------------------------------------

    def new_pipe(self) -> int:
        self.pipes.append([])
        return len(self.pipes) - 1

    def pipeline(self, node: Node, ctx: Ctx, stack: list[tuple[Node, Ctx]]) -> None:
        elements = self.pipe_elements(node, stack)
        pid = self.new_pipe()
        for i in range(len(elements) - 1, -1, -1):
            stack.append((elements[i], (pid, i, ctx[2], ctx[3])))

    def pipe_elements(self, node: Node, stack: list[tuple[Node, Ctx]]) -> list[Node]:
        """The commands of a pipeline, left to right.

        tree-sitter-bash nests ``a | b 2>&1 | c`` as ((a | b) 2>&1) | c: the inner pipeline
        is flattened into this one and its redirects go to its last command, as in bash.
        """
        out: list[Node] = []
        todo = [node]
        while todo:
            current = todo.pop()
            self.budget.charge(current.child_count)
            for child in current.children:
                if not child.is_named or child.type == "comment":
                    continue
                if child.type == "pipeline":
                    todo.append(child)
                    continue
                if child.type == "redirected_statement":
                    body = _statement_body(child)
                    if body is not None and body.type == "pipeline":
                        reds = [c for c in child.children if c.type in _REDIRECT_TYPES]
                        last = _last_pipeline_element(body, self.budget)
                        key = (last.start_byte, last.end_byte, last.type)
                        self.pending.setdefault(key, []).extend(reds)
                        stack.extend((red, _NO_CTX) for red in reds)  # $( ) in targets
                        todo.append(body)
                        continue
                out.append(child)
        out.sort(key=lambda n: n.start_byte)
        return out

    @staticmethod
    def continuation(redirects: Sequence[Node]) -> Node | None:
        """``cat <<EOF | sh``: tree-sitter puts ``| sh`` inside the here-document node."""
        for red in redirects:
            if red.type != "heredoc_redirect":
                continue
            for child in red.children:
                if (
                    child.type == "pipeline"
                    and child.child_count
                    and child.children[0].type
                    in (
                        "|",
                        "|&",
                    )
                ):
                    return child
        return None

    def heredoc_children(self, node: Node, ctx: Ctx, stack: list[tuple[Node, Ctx]]) -> None:
        for child in reversed(node.children):
            if child.type == "heredoc_body" and not self.heredoc_quoted(node):
                self.heredoc_backticks(child)
            if not child.is_named or child.child_count == 0:
                continue
            if child.type == "pipeline" and child.children[0].type in ("|", "|&"):
                pid, pos = ctx[0], ctx[1]
                if pid < 0:
                    pid, pos = self.new_pipe(), 0
                elements = self.pipe_elements(child, stack)
                for i in range(len(elements) - 1, -1, -1):
                    stack.append((elements[i], (pid, pos + 1 + i, ctx[2], ctx[3])))
            elif child.type == "heredoc_body":
                stack.append((child, _NO_CTX))
            else:
                stack.append((child, ctx))

    def heredoc_quoted(self, node: Node) -> bool:
        data = self.job.data
        start = next((c for c in node.children if c.type == "heredoc_start"), None)
        if start is None:
            return False
        return any(data.find(q, start.start_byte, start.end_byte) >= 0 for q in b"'\"\\")

    def heredoc_backticks(self, body: Node) -> None:
        """`cmd` in an unquoted here-document runs; tree-sitter-bash leaves it as text."""
        data = self.job.data
        if data.find(b"`", body.start_byte, body.end_byte) < 0:
            return
        texts: list[tuple[int, int]] = []  # the literal text between expansions
        pos = body.start_byte
        for part in body.children:
            if part.type in _EXPANSIONS:
                texts.append((pos, part.start_byte))
                pos = part.end_byte
        texts.append((pos, body.end_byte))
        for start, end in texts:
            self.budget.charge(end - start)
            text = _text(data, start, end)
            for match in _BACKTICKS_RE.finditer(text):
                if match.group(1) is None:
                    continue  # an escaped character
                inner = re.sub(r"\\([`$\\])", r"\1", match.group(1))
                self.queue_job(self.job, inner, (start, end), self.job.wrappers, False, "`...`")

    def redirected(
        self,
        node: Node,
        ctx: Ctx,
        job: _Job,
        stack: list[tuple[Node, Ctx]],
        extra: Sequence[Node] = (),
    ) -> None:
        body: Node | None = None
        reds: list[Node] = []
        for child in node.children:
            if child.type in _REDIRECT_TYPES:
                reds.append(child)
            elif child.is_named and child.type != "comment" and body is None:
                body = child
        if self.continuation(reds) is not None and ctx[0] < 0:
            ctx = (self.new_pipe(), 0, ctx[2], ctx[3])
        for red in reversed(reds):
            stack.append((red, ctx))
        reds.extend(extra)
        if body is not None and body.type == "command":
            self.command(body, ctx, job, reds, node, stack)
            return
        if body is None:
            self.command(node, ctx, job, reds, node, stack, redirects_only=True)
            return
        target = body
        while target.type in ("list", "pipeline", "negated_command"):
            kids = [c for c in target.children if c.is_named and c.type != "comment"]
            if not kids:
                break
            target = kids[-1]
        if target is body:  # a compound command: the redirects apply to all of it
            redirs = tuple(r for red in reds for r in self.redirect(red, job.data))
            stack.append((body, self.with_redirects(ctx, redirs)))
        else:
            key = (target.start_byte, target.end_byte, target.type)
            self.pending.setdefault(key, []).extend(reds)
            stack.append((body, ctx))

    # -- redirects -------------------------------------------------------------------------

    def redirect(self, node: Node, data: bytes, fd: int | None = None) -> list[_Redir]:
        out: list[_Redir] = []
        op = ""
        dests: list[Node] = []
        t = node.type
        for child in node.children:
            ct = child.type
            if ct == "file_descriptor":
                text = _text(data, child.start_byte, min(child.end_byte, child.start_byte + 10))
                fd = int(text) if text.isdigit() and len(text) < 10 else None
            elif not child.is_named and not op and ct not in ("(", ")"):
                op = _text(data, child.start_byte, child.end_byte)
            elif ct in ("file_redirect", "herestring_redirect") and t == "heredoc_redirect":
                out.extend(self.redirect(child, data))
            elif ct in ("heredoc_start", "heredoc_body", "heredoc_end", "pipeline", "ERROR"):
                continue
            elif child.is_named and t != "heredoc_redirect":
                dests.append(child)
        if t == "heredoc_redirect":
            out.insert(0, self.heredoc(node, data, fd))
            return out
        word = _word([dests[0]], data, self.budget) if dests else None
        target = word.value if word else ""
        if op.endswith("-") and len(op) > 1 and op[-2] == "&":  # >&- <&- : close
            op, target = op[:-1], "-"
        if (
            op == ">&"
            and fd is None
            and word is not None
            and not target.isdigit()
            and target != "-"
        ):
            op = "&>"  # >&word is &>word
        out.insert(
            0,
            _Redir(
                op=op or ">",
                fd=fd,
                target=target,
                dynamic=bool(word and (word.dynamic or word.procsub)),
                word=word,
            ),
        )
        return out

    def heredoc(self, node: Node, data: bytes, fd: int | None) -> _Redir:
        op = "<<"
        quoted = False
        strip_tabs = False
        body = ""
        dynamic = False
        span = (node.start_byte, node.end_byte)
        for child in node.children:
            ct = child.type
            if not child.is_named and ct in ("<<", "<<-"):
                strip_tabs = data[child.start_byte : child.end_byte].endswith(b"-")
            elif ct == "heredoc_start":
                quoted = any(data.find(q, child.start_byte, child.end_byte) >= 0 for q in b"'\"\\")
            elif ct == "heredoc_body":
                span = (child.start_byte, child.end_byte)
                builder = _WordBuilder(self.budget)
                if quoted:
                    builder.add(_text(data, child.start_byte, child.end_byte), "Q")
                else:
                    pos = child.start_byte
                    for part in child.children:
                        if part.type in _EXPANSIONS:
                            if part.start_byte > pos:
                                builder.double_quoted(_text(data, pos, part.start_byte), "$`\\")
                            builder.add(_text(data, part.start_byte, part.end_byte), "X")
                            pos = part.end_byte
                    if child.end_byte > pos:
                        builder.double_quoted(_text(data, pos, child.end_byte), "$`\\")
                built = builder.build(child.start_byte, child.end_byte)
                body, dynamic = built.value, built.dynamic
                if not quoted and any(m.group(1) is not None for m in _BACKTICKS_RE.finditer(body)):
                    dynamic = True
                if strip_tabs:
                    self.budget.charge(len(body))
                    body = "\n".join(line.lstrip("\t") for line in body.split("\n"))
        return _Redir(
            op=op,
            fd=fd,
            target="",
            dynamic=False,
            body=body,
            body_dynamic=dynamic,
            body_span=span,
            heredoc=True,
        )

    # -- commands --------------------------------------------------------------------------

    def command(
        self,
        node: Node,
        ctx: Ctx,
        job: _Job,
        extra_redirects: Sequence[Node],
        span_node: Node,
        stack: list[tuple[Node, Ctx]],
        redirects_only: bool = False,
    ) -> None:
        data = job.data
        word_nodes: list[Node] = []
        assign_nodes: list[Node] = []
        red_nodes: list[Node] = list(extra_redirects)
        own_reds: list[Node] = []
        background = ctx[2]
        if not redirects_only:
            for child in node.children:
                t = child.type
                if t == "variable_assignment" and not word_nodes:
                    assign_nodes.append(child)
                elif t == "command_name":
                    inner = child.named_children
                    word_nodes.append(inner[0] if inner else child)
                elif t in _REDIRECT_TYPES:
                    red_nodes.append(child)
                    own_reds.append(child)
                elif t in ("comment", "ERROR"):
                    continue
                elif t in ("subshell", "compound_statement"):  # coproc ( ... ), time ( ... )
                    first = word_nodes[0] if word_nodes else child
                    bg = ctx[2] or data[first.start_byte : first.end_byte] == b"coproc"
                    stack.append((child, (ctx[0], ctx[1], bg, ctx[3])))
                elif child.is_named or t == "$":
                    word_nodes.append(child)
        redirs = self.inherited(ctx)
        if red_nodes:
            red_nodes.sort(key=lambda n: n.start_byte)
            for red in red_nodes:
                if red.type == "file_redirect":
                    dests = [c for c in red.children if c.is_named and c.type != "file_descriptor"]
                    word_nodes.extend(dests[1:])  # `echo > a b`: b is an argument of echo
            word_nodes.sort(key=lambda n: n.start_byte)
            # `cat 0<f`, `cmd 2>a 0>b`: tree-sitter-bash may read a descriptor as a word.
            fds: dict[int, int] = {}
            red_starts = {r.start_byte for r in red_nodes}
            for w in word_nodes:
                if w.end_byte in red_starts and w.type in ("number", "word"):
                    text = data[w.start_byte : w.end_byte]
                    if text.isdigit() and len(text) < 10:
                        fds[w.end_byte] = int(text)
            if fds:
                word_nodes = [w for w in word_nodes if w.end_byte not in fds]
            for red in red_nodes:
                redirs.extend(self.redirect(red, data, fds.get(red.start_byte)))
        for red in reversed(own_reds):
            stack.append((red, ctx))
        for child in reversed(word_nodes):
            if child.child_count:
                stack.append((child, _NO_CTX))
        for a in assign_nodes:
            for part in a.named_children[1:]:
                if part.child_count:
                    stack.append((part, _NO_CTX))
        if (
            len(word_nodes) == 1
            and word_nodes[0].type == "word"
            and data[word_nodes[0].start_byte : word_nodes[0].end_byte] == b"}"
        ):
            return  # a stray `}` of `coproc NAME { ...; }`, which tree-sitter-bash splits
        words = [_word(group, data, self.budget) for group in _group_words(word_nodes, data)]
        dropped = self.dropped_words(job, span_node, assign_nodes, word_nodes, red_nodes)
        if dropped:
            words = sorted([*words, *dropped], key=lambda w: w.start)
        if not words and not redirs:
            return
        assignments = [_assignment(a, data, self.budget) for a in assign_nodes]
        end = node.end_byte
        for red in red_nodes:
            if red.type == "heredoc_redirect":
                for part in red.children:
                    if part.type in ("heredoc_start", "file_redirect", "herestring_redirect"):
                        end = max(end, part.end_byte)
            else:
                end = max(end, red.end_byte)
        start = span_node.start_byte
        cmd = _Cmd(
            words=words,
            assignments=assignments,
            redirects=redirs,
            wrappers=job.wrappers,
            job=job,
            nspan=(start, end),
            pid=ctx[0],
            pos=ctx[1],
            background=background,
            depth=job.depth,
        )
        self.add(cmd)
        self.unwrap(cmd)

    def dropped_words(
        self,
        job: _Job,
        span_node: Node,
        assign_nodes: Sequence[Node],
        word_nodes: Sequence[Node],
        red_nodes: Sequence[Node],
    ) -> list[_Word]:
        """Words tree-sitter-bash leaves out of the tree without an error.

        Known case: the `-` of `python3 - <<EOF` (and `cmd -<<EOF`). A lone `-` is put
        back; any other unexplained text fails closed with a parse.error finding.
        """
        data = job.data
        out: list[_Word] = []
        items: list[tuple[int, int]] = [(n.start_byte, n.end_byte) for n in assign_nodes]
        items += [(n.start_byte, n.end_byte) for n in word_nodes]
        for red in red_nodes:
            if red.type == "heredoc_redirect":
                op = next((c for c in red.children if not c.is_named), None)
                if op is not None and data[op.start_byte : op.start_byte + 1] == b"-":
                    out.append(_Word.literal("-", op.start_byte, op.start_byte + 1))
                    items.append((op.start_byte, red.end_byte))
                    continue
            items.append((red.start_byte, red.end_byte))
        items.sort()
        pos = span_node.start_byte
        for start, end in items:
            if start > pos and (start > pos + 1 or data[pos] != 0x20):
                self.budget.charge(start - pos)
                gap = data[pos:start].replace(b"\\\n", b"").strip(b" \t\n\r\x0b\x0c\x00")
                if gap == b"-":
                    at = data.index(b"-", pos, start)
                    out.append(_Word.literal("-", at, at + 1))
                elif gap:
                    self.finding_at(
                        PARSE_ERROR,
                        "Part of the command could not be parsed "
                        f"({_short(_dec(gap[:200]))}); only the parts that parsed were "
                        "analysed.",
                        job,
                        (pos, start),
                    )
            pos = max(pos, end)
        return out

    def declaration(self, node: Node, ctx: Ctx, job: _Job, stack: list[tuple[Node, Ctx]]) -> None:
        data = job.data
        keyword = ""
        words: list[_Word] = []
        assignments: list[tuple[str, str]] = []
        parts: list[Node] = []  # to search for $( ), in order
        for child in node.children:
            if not child.is_named:
                if not keyword:
                    keyword = _text(data, child.start_byte, child.end_byte)
                continue
            if child.type == "comment":
                continue
            words.append(_word([child], data, self.budget))
            if child.type == "variable_assignment":
                assignments.append(_assignment(child, data, self.budget))
                parts.extend(child.named_children[1:])
            else:
                parts.append(child)
        stack.extend((part, _NO_CTX) for part in reversed(parts) if part.child_count)
        kw = _Word.literal(keyword, node.start_byte, node.start_byte + len(keyword))
        self.statement(node, ctx, job, [kw, *words], assignments)

    def statement(
        self,
        node: Node,
        ctx: Ctx,
        job: _Job,
        words: list[_Word],
        assignments: list[tuple[str, str]],
    ) -> None:
        """A command that is a whole statement (a declaration, bare assignments): it wraps
        nothing, so it is finished at once."""
        cmd = _Cmd(
            words=words,
            assignments=assignments,
            redirects=self.inherited(ctx),
            wrappers=job.wrappers,
            job=job,
            nspan=(node.start_byte, node.end_byte),
            pid=ctx[0],
            pos=ctx[1],
            background=ctx[2],
            depth=job.depth,
        )
        self.add(cmd)
        self.finish(cmd)


def _statement_body(node: Node) -> Node | None:
    """The body of a redirected_statement: its first named child that is not a redirect."""
    for child in node.children:
        if child.is_named and child.type not in _REDIRECT_TYPES and child.type != "comment":
            return child
    return None


def _last_pipeline_element(pipeline: Node, budget: _Budget) -> Node:
    node = pipeline
    for _ in range(1_000_000):  # bounded by the tree's depth, and by the budget
        budget.charge(1)
        kids = [c for c in node.children if c.is_named and c.type != "comment"]
        if not kids:
            return node
        last = kids[-1]
        if last.type == "redirected_statement":
            body = _statement_body(last)
            if body is not None and body.type == "pipeline":
                node = body
                continue
        if last.type != "pipeline":
            return last
        node = last
    return node  # pragma: no cover
