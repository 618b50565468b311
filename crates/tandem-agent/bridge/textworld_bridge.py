# TextWorld behind JSON lines, for tandem's Rust side (crates/tandem-agent/src/bridge.rs).
# One request per line on stdin, one reply per line on stdout:
#   {"op":"make","seed":N,"rooms":R,"objects":O,"quest_length":Q,"path":P} -> {"ok":true,"path":P}
#   {"op":"reset","game":P}  -> {"ok":true, ...state}
#   {"op":"step","action":A} -> {"ok":true, ...state}
#   {"op":"ping"}            -> {"ok":true}
# state: observation, description, inventory, objective, admissible, score, max_score, moves,
# done, won, lost. Errors: {"ok":false,"error":"..."}; the process keeps serving after them.
import json
import os
import sys


def main():
    out = sys.stdout
    # Anything TextWorld prints must not corrupt the reply stream.
    sys.stdout = sys.stderr
    import textworld
    from textworld import EnvInfos
    from textworld.generator import GameOptions, compile_game, make_game

    infos = EnvInfos(
        admissible_commands=True, score=True, max_score=True, won=True, lost=True,
        objective=True, description=True, inventory=True, moves=True,
    )
    env = None

    def state(gs, done):
        return {
            "ok": True,
            "observation": gs.feedback or "",
            "description": gs["description"] or "",
            "inventory": gs["inventory"] or "",
            "objective": gs["objective"] or "",
            "admissible": sorted(gs["admissible_commands"] or []),
            "score": int(gs["score"] or 0),
            "max_score": int(gs["max_score"] or 0),
            "moves": int(gs["moves"] or 0),
            "done": bool(done),
            "won": bool(gs["won"]),
            "lost": bool(gs["lost"]),
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
            elif op == "make":
                path = req["path"]
                if not os.path.exists(path):
                    opts = GameOptions()
                    opts.seeds = int(req["seed"])
                    opts.nb_rooms = int(req["rooms"])
                    opts.nb_objects = int(req["objects"])
                    opts.quest_length = int(req["quest_length"])
                    opts.path = path
                    opts.force_recompile = True
                    compile_game(make_game(opts), opts)
                reply = {"ok": True, "path": path}
            elif op == "reset":
                if env is not None:
                    env.close()
                env = textworld.start(req["game"], request_infos=infos)
                reply = state(env.reset(), False)
            elif op == "step":
                if env is None:
                    raise ValueError("step before reset")
                gs, _, done = env.step(str(req["action"]))
                reply = state(gs, done)
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # reported to the caller, which decides what to do
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
