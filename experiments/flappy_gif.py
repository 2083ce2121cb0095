"""A GIF of a dqn_flappy.py pixel agent playing: the game beside the frames its network saw.

    python experiments/flappy_gif.py runs/<run>/dqn_flappy.pt --out docs/dqn_flappy_pixels.gif

Plays the network the checkpoint delivers (its best greedy evaluation, as --eval-checkpoint plays
it) greedily on the first episode of the final evaluation's seeds. Left, the game as it draws
itself; right, the newest of the stacked 84x84 grayscale frames the network acted on, 3x larger.
One frame is kept per --every agent steps (an agent step is the checkpoint's --action-repeat game
frames; the game runs at 30 a second), for at most --seconds seconds of play, so that the file
stays small (the last line says its size).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GAP = 8  # pixels between the two views
SCALE = 3  # the network's 84x84 frame, drawn this many times larger


def side_by_side(game: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """One GIF frame: the game at half size, then the network's frame upscaled, on white."""
    from PIL import Image

    height, width = game.shape[0] // 2, game.shape[1] // 2
    small = np.asarray(Image.fromarray(game).resize((width, height), Image.Resampling.BOX))
    big = np.repeat(np.repeat(seen, SCALE, axis=0), SCALE, axis=1)
    canvas = np.full((max(height, big.shape[0]), width + GAP + big.shape[1], 3), 255, np.uint8)
    canvas[:height, :width] = small
    canvas[: big.shape[0], width + GAP :] = big[..., None]
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a dqn_flappy.py checkpoint trained with pixels")
    parser.add_argument("--out", type=Path, default=Path("dqn_flappy_pixels.gif"))
    parser.add_argument("--seconds", type=float, default=10.0, help="most seconds of play kept")
    parser.add_argument("--every", type=int, default=2, help="keep one agent step in this many")
    options = parser.parse_args(argv)
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    sys.path.insert(0, str(ROOT))
    import torch
    from PIL import Image

    import dqn_flappy

    args = dqn_flappy.parse_args(["--eval-checkpoint", options.checkpoint])
    if args.obs_type != "pixels":
        dqn_flappy.fail(f"{options.checkpoint} was trained on {args.obs_type}, not pixels")
    checkpoint = dqn_flappy.load_checkpoint(options.checkpoint)
    device = dqn_flappy.pick_device(False, args.torch_threads)
    q_network = dqn_flappy.build_q_network(args, device)
    dqn_flappy.restore(checkpoint, options.checkpoint, model=q_network)
    dqn_flappy.load_delivered(q_network, checkpoint["best"])

    env = dqn_flappy.make_env(args, render=True)
    obs, _ = env.reset(seed=args.seed + dqn_flappy.EVAL_SEED_OFFSET)
    frames, pipes, done = [], 0, False
    for step in range(int(options.seconds * 30 / args.action_repeat)):  # 30 game frames a s
        if step % options.every == 0:
            frames.append(side_by_side(env.render(), obs[-1]))
        with torch.inference_mode():
            action = q_network(torch.as_tensor(obs[None], device=device)).argmax(dim=1).item()
        obs, _, terminated, truncated, info = env.step(action)
        pipes, done = info.get("score", pipes), terminated or truncated
        if done:
            break
    env.close()
    images = [Image.fromarray(frame) for frame in frames]
    options.out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(
        options.out, save_all=True, append_images=images[1:], loop=0, optimize=True,
        duration=round(1000 * options.every * args.action_repeat / 30),
    )  # fmt: skip
    ended = "the episode ended" if done else f"stopped after {options.seconds:g} s"
    size = options.out.stat().st_size / 1e6
    print(f"wrote {options.out}: {len(frames)} frames, {pipes} pipes, {ended}; {size:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
