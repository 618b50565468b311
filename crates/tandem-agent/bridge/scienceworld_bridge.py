# ScienceWorld behind JSON lines, for tandem's Rust side (crates/tandem-agent/src/env/scienceworld.rs).
# One request per line on stdin, one reply per line on stdout:
#   {"op":"ping"}                 -> {"ok":true}
#   {"op":"tasks"}                -> {"ok":true,"tasks":[names]}
#   {"op":"variations","task":T}  -> {"ok":true,"task":T,"count":N,"train":[..],"dev":[..],"test":[..]}
#   {"op":"reset","task":T,"variation":V,"step_limit":L,"max_actions":M,
#    "simplifications":S|null,"gold":bool}  -> {"ok":true, ...state}
#   {"op":"step","action":A}      -> {"ok":true, ...state}
#   {"op":"gold"}                 -> {"ok":true,"actions":[..]}  (after a reset with "gold":true)
# state: observation, description (the room, "look around"), inventory, objective (the task),
# admissible, admissible_total, score, raw_score, max_score, moves, done, won, lost, task, variation.
# Errors: {"ok":false,"error":"..."}; the process keeps serving after them.
#
# One JVM serves every episode: ScienceWorldEnv starts it once (about 2 s) and `load` switches task
# and variation (well under 1 s).
#
# Choices, so that what the Rust side sees is bounded and deterministic:
# - admissible: ScienceWorld's valid action-object combinations, deduplicated and sorted. Past
#   max_actions (0: no cap) they are cut deterministically: every action naming at most one object
#   is kept first (in sorted order), then the two-object ones ("move X to Y", "use X on Y", ...)
#   in the order of a hash of their text (an arbitrary but fixed sample, independent of the order
#   ScienceWorld lists them in), until the cap; the result is sorted. admissible_total is the count
#   before the cut. Not reproducible word for word: ScienceWorld names each object in them by one
#   of its names drawn at random on every call ("focus on paint in cup", "focus on red paint on
#   wood cup"), and seeding its generator does not fix that across reloads (the draw follows the
#   objects' hash order), nor is the order in which a room's objects are listed in an
#   observation. Scores, moves, the observations' lines as a set and the number of actions replay.
# - simplifications: null means ScienceWorld's "noElectricalAction" on every task that needs no
#   wiring (it drops the hundreds of `connect X to Y` combinations that do nothing there) and none
#   on the electrical tasks (power-component*, *conductivity*); a string is passed as given.
# - score: ScienceWorld's 0-100 task score. A failed task (e.g. focusing on the wrong object) has
#   a negative raw score: score is then 0, raw_score keeps it, and lost is true.
# - won: the raw score reached 100. done: won, lost, ScienceWorld's own completion flag, or moves
#   reaching step_limit.
# - an ambiguous command ("Ambiguous request: Please enter the number ...") is answered with 0, the
#   first reading, as ScienceWorld's own agents do; the reply's observation is that answer's.
import hashlib
import json
import sys

ELECTRICAL = ("power-component", "conductivity")


def is_electrical(task):
    return any(e in task for e in ELECTRICAL)


def strip_prefix(text, prefix):
    return text[len(prefix):] if text.startswith(prefix) else text


def object_slots(action, templates):
    # The number of objects an action names: its template's count of OBJ, matched by its leading
    # words ("move OBJ to OBJ" -> 2). Actions without a known template count as one.
    best = None
    for verb, slots in templates:
        if action == verb or action.startswith(verb + " "):
            if best is None or len(verb) > len(best[0]):
                best = (verb, slots)
    return best[1] if best else 1


def bounded(valid, cap, templates):
    actions = sorted(set(valid))
    if cap <= 0 or len(actions) <= cap:
        return actions
    single = [a for a in actions if object_slots(a, templates) <= 1]
    double = [a for a in actions if object_slots(a, templates) > 1]
    double.sort(key=lambda a: hashlib.sha1(a.encode()).hexdigest())
    return sorted((single + double)[:cap])


def main():
    out = sys.stdout
    # Anything ScienceWorld or py4j prints must not corrupt the reply stream.
    sys.stdout = sys.stderr
    try:
        import shutil

        from scienceworld import ScienceWorldEnv

        if shutil.which("java") is None:
            raise RuntimeError("no `java` on PATH (ScienceWorld needs Java 17): run scripts/setup-scienceworld")
        # The step limit is ours (see done above): ScienceWorld's own is set out of reach.
        env = ScienceWorldEnv("", envStepLimit=10**9)
    except Exception as e:
        # Every request, the first ping included, is told why: the caller's error names it.
        message = f"ScienceWorld could not start: {type(e).__name__}: {e}"
        for _ in sys.stdin:
            out.write(json.dumps({"ok": False, "error": message}) + "\n")
            out.flush()
        return
    tasks = list(env.get_task_names())
    # Leading words of each action template ("move", "pick up", ...) and their object count.
    templates = []
    for t in env.get_possible_actions():
        words = t.split(" OBJ")[0].strip()
        templates.append((words, t.count("OBJ")))
    episode = {}

    def check_task(task):
        if task not in tasks:
            raise ValueError(f"unknown task {task!r}; ScienceWorld's tasks are: {', '.join(tasks)}")

    def state(observation, info, completed):
        raw = int(info["score"])
        moves = int(info["moves"])
        won = raw >= 100
        lost = raw < 0
        valid = info["valid"]
        admissible = bounded(valid, episode["max_actions"], templates)
        return {
            "ok": True,
            "observation": observation or "",
            "description": info["look"] or "",
            "inventory": info["inv"] or "",
            "objective": strip_prefix(info["taskDesc"] or "", "Task Description:").strip(),
            "admissible": admissible,
            "admissible_total": len(set(valid)),
            "score": max(0, min(100, raw)),
            "raw_score": raw,
            "max_score": 100,
            "moves": moves,
            "done": bool(won or lost or completed or moves >= episode["step_limit"]),
            "won": won,
            "lost": lost,
            "task": episode["task"],
            "variation": episode["variation"],
        }

    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "ping":
                reply = {"ok": True}
            elif op == "tasks":
                reply = {"ok": True, "tasks": tasks}
            elif op == "variations":
                task = str(req["task"])
                check_task(task)
                # The splits are the loaded task's: load its first variation to read them.
                env.load(task, 0, "")
                episode.clear()
                reply = {
                    "ok": True,
                    "task": task,
                    "count": int(env.get_max_variations(task)),
                    "train": sorted(int(v) for v in env.get_variations_train()),
                    "dev": sorted(int(v) for v in env.get_variations_dev()),
                    "test": sorted(int(v) for v in env.get_variations_test()),
                }
            elif op == "reset":
                task = str(req["task"])
                check_task(task)
                variation = int(req["variation"])
                count = int(env.get_max_variations(task))
                if not 0 <= variation < count:
                    raise ValueError(
                        f"task {task!r} has {count} variations (0 to {count - 1}), not {variation}"
                    )
                step_limit = int(req.get("step_limit") or 100)
                if step_limit < 1:
                    raise ValueError(f"step_limit must be at least 1, not {step_limit}")
                simplifications = req.get("simplifications")
                if simplifications is None:
                    simplifications = "" if is_electrical(task) else "noElectricalAction"
                gold = bool(req.get("gold"))
                env.load(task, variation, str(simplifications), generateGoldPath=gold)
                episode.clear()
                episode.update(
                    task=task, variation=variation, step_limit=step_limit,
                    max_actions=int(req.get("max_actions") or 0), gold=gold,
                )
                observation, info = env.reset()
                reply = state(observation, info, False)
            elif op == "step":
                if not episode:
                    raise ValueError("step before reset")
                observation, _, completed, info = env.step(str(req["action"]))
                if observation.startswith("Ambiguous request"):
                    observation, _, completed, info = env.step("0")
                reply = state(observation, info, completed)
            elif op == "gold":
                if not episode.get("gold"):
                    raise ValueError('no gold path: reset with "gold": true first')
                reply = {"ok": True, "actions": list(env.get_gold_action_sequence())}
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # reported to the caller, which decides what to do
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
