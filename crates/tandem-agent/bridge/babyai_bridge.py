# BabyAI as text (BabyAI-Text, Carta et al. 2023) behind JSON lines, for tandem's Rust side
# (crates/tandem-agent/src/env/babyai.rs). One request per line on stdin, one reply per line on
# stdout:
#   {"op":"ping"}                               -> {"ok":true}
#   {"op":"levels"}                             -> {"ok":true,"levels":[suggested],"all":[every BabyAI level]}
#   {"op":"reset","level":L,"seed":S,"step_limit":N} -> {"ok":true, ...state}
#   {"op":"step","action":A}                    -> {"ok":true, ...state}
# state: observation (what the agent sees, one sentence a line), description (the same),
# inventory, objective (the mission), admissible (the six actions), score, max_score, moves,
# done, won, lost, reward, level, seed, expert. Errors: {"ok":false,"error":"..."}; the process keeps
# serving after them (an action outside the six is one).
#
# The rendering follows BabyAI-Text's: from the agent's 7x7 egocentric view (walls hide what is
# behind them), "You carry a red ball" when carrying; "You see a wall N steps forward|left|right"
# for the first thing straight ahead, left and right when it is a wall; and for every other thing
# in view "You see a red ball 2 steps left and 1 step forward" ("... 3 steps forward" straight
# ahead, "... 1 step right" level with the agent); doors with their state ("a closed red door",
# "an open red door", "a locked red door").
#
# expert: the action BabyAI's own bot (minigrid.utils.baby_ai_bot, which solves these levels from
# the full grid) suggests in this state, told after every step which action was actually taken
# (its advising mode); null once it has none (it says "done", or fails on a state it cannot plan
# from). A stand-in large policy that knows what to do, for studying the switching controller.
#
# score: 100 times minigrid's reward for the episode (1 - 0.9 * steps / the level's max_steps on
# success, 0 otherwise), rounded; won: the mission was achieved; lost: the level ended it as failed.
# done: won, lost, the level's own step budget, or moves reaching step_limit.
import json
import sys

ACTIONS = ["turn left", "turn right", "go forward", "pick up", "drop", "toggle"]
# BabyAI-Text's tasks (go to, pick up, put next to, open a locked door) in one room, as minigrid
# ships them, with GoToObj as a sanity level (one object, nothing else).
LEVELS = [
    "BabyAI-GoToObj-v0",
    "BabyAI-GoToLocal-v0",
    "BabyAI-PickupLoc-v0",
    "BabyAI-PutNextLocal-v0",
    "BabyAI-UnlockLocal-v0",
]
# minigrid's encoding: object type ids, and door states.
UNSEEN, EMPTY, WALL, DOOR = 0, 1, 2, 4
DOOR_STATES = {0: "open", 1: "closed", 2: "locked"}


def steps(n, direction):
    return f"{n} step{'s' if n > 1 else ''} {direction}"


def describe(env):
    from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT

    grid, vis_mask = env.gen_obs_grid()
    image = grid.encode(vis_mask)  # [x][y] = (type, color, state); the agent at the bottom middle
    width, height = image.shape[0], image.shape[1]
    ax, ay = width // 2, height - 1
    lines = []
    if env.carrying is not None:
        lines.append(f"You carry a {env.carrying.color} {env.carrying.type}")

    def first_wall(cells, direction):
        for n, (x, y) in enumerate(cells, start=1):
            kind = image[x][y][0]
            if kind in (UNSEEN, EMPTY):
                continue
            if kind == WALL:
                lines.append(f"You see a wall {steps(n, direction)}")
            return

    first_wall([(ax, y) for y in range(ay - 1, -1, -1)], "forward")
    first_wall([(x, ay) for x in range(ax - 1, -1, -1)], "left")
    first_wall([(x, ay) for x in range(ax + 1, width)], "right")

    for x in range(width):
        for y in range(height):
            kind, color, st = (int(v) for v in image[x][y])
            if kind in (UNSEEN, EMPTY, WALL) or (x, y) == (ax, ay):
                continue
            name = f"{IDX_TO_COLOR[color]} {IDX_TO_OBJECT[kind]}"
            if kind == DOOR:
                state = DOOR_STATES.get(st, "closed")
                name = f"{state} {name}"
            article = "an" if name[0] in "aeiou" else "a"
            dx, dy = x - ax, ay - y
            side = steps(abs(dx), "left" if dx < 0 else "right") if dx else ""
            ahead = steps(dy, "forward") if dy else ""
            where = " and ".join(p for p in (side, ahead) if p)
            lines.append(f"You see {article} {name} {where}")
    return lines


def main():
    out = sys.stdout
    # Anything minigrid prints ("Sampling rejected: ...") must not corrupt the reply stream.
    sys.stdout = sys.stderr
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the BabyAI levels)

    from minigrid.utils.baby_ai_bot import BabyAIBot

    all_levels = sorted(k for k in gym.registry if k.startswith("BabyAI-"))
    envs = {}
    episode = {}

    def state(reward, terminated, truncated):
        env = episode["env"]
        won = bool(terminated and reward > 0)
        lines = describe(env)
        view = "\n".join(lines) if lines else "You see nothing around you"
        carrying = env.carrying
        moves = int(env.step_count)
        return {
            "ok": True,
            "observation": view,
            "description": view,
            "inventory": f"You carry a {carrying.color} {carrying.type}" if carrying else "You carry nothing",
            "objective": str(env.mission),
            "admissible": list(ACTIONS),
            "score": int(round(100 * reward)) if won else 0,
            "max_score": 100,
            "moves": moves,
            "done": bool(terminated or truncated or moves >= episode["step_limit"]),
            "won": won,
            "lost": bool(terminated and not won),
            "reward": float(reward),
            "level": episode["level"],
            "seed": episode["seed"],
            "expert": episode.get("expert"),
        }

    def advise(taken):
        # The bot replans after every step, whoever acted. Where its plan cannot continue (its own
        # asserts, e.g. after another policy's detour), a fresh bot plans from the current state;
        # only if that fails too is it silent for the rest of the episode.
        bot = episode.get("bot")
        episode["expert"] = None
        if bot is None:
            return
        try:
            a = bot.replan(taken)
        except Exception:
            try:
                bot = BabyAIBot(episode["env"])
                episode["bot"] = bot
                a = bot.replan()
            except Exception:
                episode["bot"] = None
                return
        a = int(a)
        episode["expert"] = ACTIONS[a] if 0 <= a < len(ACTIONS) else None

    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "ping":
                reply = {"ok": True}
            elif op == "levels":
                reply = {"ok": True, "levels": LEVELS, "all": all_levels}
            elif op == "reset":
                level = str(req["level"])
                if level not in all_levels:
                    raise ValueError(
                        f"unknown BabyAI level {level!r}; e.g. {', '.join(LEVELS)} "
                        f"(minigrid has {len(all_levels)})"
                    )
                seed = int(req["seed"])
                if seed < 0:
                    raise ValueError(f"a seed is a natural number, not {seed}")
                step_limit = int(req.get("step_limit") or 64)
                if step_limit < 1:
                    raise ValueError(f"step_limit must be at least 1, not {step_limit}")
                if level not in envs:
                    # The raw level: minigrid's own max_steps ends an episode, no gym wrappers.
                    envs[level] = gym.make(level).unwrapped
                env = envs[level]
                env.reset(seed=seed)
                episode.clear()
                episode.update(env=env, level=level, seed=seed, step_limit=step_limit)
                try:
                    episode["bot"] = BabyAIBot(env)
                except Exception:  # a level whose instructions the bot does not parse
                    episode["bot"] = None
                advise(None)
                reply = state(0.0, False, False)
            elif op == "step":
                if not episode:
                    raise ValueError("step before reset")
                action = str(req["action"])
                if action not in ACTIONS:
                    raise ValueError(f"unknown action {action!r}; BabyAI's are: {', '.join(ACTIONS)}")
                index = ACTIONS.index(action)
                _, reward, terminated, truncated, _ = episode["env"].step(index)
                if terminated or truncated:
                    episode["bot"] = None
                advise(index)
                reply = state(float(reward), terminated, truncated)
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # reported to the caller, which decides what to do
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
