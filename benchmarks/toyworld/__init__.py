"""toyworld: does projection beat random init? A convergence study on a trained toy Wan teacher.

`python -m benchmarks.toyworld --help`. The pipeline, each stage cached in the work directory:

1. `world`: a synthetic, text-conditioned latent distribution (shape, colour and
   size named by the prompt, rendered to 16-channel latents through a fixed
   random map) and the prompts that name it;
2. `teacher`: a two-expert Wan teacher (real diffusers classes, the real 875
   boundary, the synthetic tiny T5/VAE/tokenizer) trained with flow matching on
   that distribution, saved in the native Wan 2.2 layout;
3. `decoder`: a fixed attribute classifier trained on rendered latents, the
   ruler for attribute accuracy and the feature space of the Fréchet distance;
4. `study`: the real pipeline steps (encode-prompts, teacher-data, project,
   distill) for every init and seed, then held-out velocity MSE per checkpoint,
   samples, Fréchet distance and attribute accuracy; a table, a JSON and a PNG.
"""
