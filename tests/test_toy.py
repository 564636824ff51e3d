"""The paper's toy: low-rank matrix sensing with a linear model (run with -s to see the numbers).

X (n, d_in) Gaussian, Y = X @ (W0 + dW) with dW of rank r and condition number 10. LoRA of rank r on
the base W0. LoRA (random init, plain SGD) against LoRA-One (spectral init from the full gradient at
W0, then ``lora_one_precond`` + the same SGD), each with its best learning rate from the same grid,
after the same number of steps. The paper's theory is for (preconditioned) gradient descent, which is
what is asserted; the same comparison with Adam as the base optimizer is printed for information.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_one_jax as lj

D_IN, D_OUT, R, N, STEPS = 32, 32, 4, 2**17, 100
LRS = jnp.array([1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0])


def problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D_IN)).astype(np.float32)
    w0 = (rng.standard_normal((D_IN, D_OUT)) / np.sqrt(D_IN)).astype(np.float32)
    u, _ = np.linalg.qr(rng.standard_normal((D_IN, R)))
    v, _ = np.linalg.qr(rng.standard_normal((D_OUT, R)))
    dw = ((u * np.array([1.0, 0.5, 0.25, 0.1])) @ v.T).astype(np.float32)
    return x, w0, dw, x @ (w0 + dw)


def sample_loss(params, batch):
    x, y = batch
    return 0.5 * jnp.mean(jnp.sum((x @ params["w"]["kernel"] - y) ** 2, -1))


def run(loss, ad0, precond, base):
    """Final loss after STEPS steps for every learning rate of the grid (vmapped, one compile)."""

    def final(lr):
        opt = optax.chain(lj.lora_one_precond(), base(lr)) if precond else base(lr)

        def body(carry, _):
            ad, state = carry
            updates, state = opt.update(jax.grad(loss)(ad), state, ad)
            return (optax.apply_updates(ad, updates), state), None

        (ad, _), _ = jax.lax.scan(body, (ad0, opt.init(ad0)), None, length=STEPS)
        return loss(ad), ad

    return jax.jit(jax.vmap(final))(LRS)


def test_lora_one_beats_lora_on_matrix_sensing():
    x, w0, dw, y = problem()
    params = {"w": {"kernel": jnp.asarray(w0)}}
    cfg = lj.LoraConfig(rank=R, alpha=float(R), targets=["w"])  # scale 1
    batches = [(x[i : i + N // 8], y[i : i + N // 8]) for i in range(0, N, N // 8)]
    grads = lj.estimate_gradient(sample_loss, params, batches, cfg, progress=False)
    gram = x.T.astype(np.float64) @ x / N
    np.testing.assert_allclose(grads["w"], -gram @ dw, atol=1e-5)  # -G = X^T X dW / n

    # Y is exactly realizable, so the sample loss is 0.5 tr(D^T (X^T X / n) D), D = A @ B - dW: train on that
    gram32 = jnp.asarray(gram, jnp.float32)

    def loss(ad):
        d = cfg.scale_for("w") * ad["w"]["a"] @ ad["w"]["b"] - dw
        return 0.5 * jnp.sum(d * (gram32 @ d))

    _, ad_lora = lj.init_adapters(params, cfg, key=jax.random.key(1))
    _, ad_one = lj.init_adapters(params, cfg, key=jax.random.key(1), method="lora-one", grads=grads)
    merged = lj.merge(params, ad_one, cfg)
    np.testing.assert_allclose(loss(ad_one), sample_loss(merged, (x, y)), rtol=1e-4)

    target = {"w": jnp.asarray(dw)}
    angles_one, angles_lora = lj.alignment(ad_one, target)["w"], lj.alignment(ad_lora, target)["w"]
    print(f"\nstep-0 max principal angles to dW's subspaces (deg): LoRA-One {angles_one}, LoRA {angles_lora}")
    assert angles_one["left"] < 2.0 and angles_one["right"] < 0.1  # aligned from step 0 (n = 4096 d)
    assert angles_lora["left"] > 45.0 and angles_lora["right"] == 90.0

    results = {}
    for base_name, base in (("sgd", optax.sgd), ("adam", optax.adam)):
        for name, ad0, precond in (("LoRA", ad_lora, False), ("LoRA-One", ad_one, True)):
            finals, ads = run(loss, ad0, precond, base)
            finals = np.where(np.isfinite(finals), np.asarray(finals), np.inf)
            best = int(np.argmin(finals))
            results[base_name, name] = (
                float(finals[best]),
                float(LRS[best]),
                jax.tree.map(lambda t, i=best: t[i], ads),
            )
            print(
                f"{base_name:4s} {name:8s} loss after {STEPS} steps by lr: "
                + " ".join(f"{lr:g}:{loss:.2e}" for lr, loss in zip(LRS.tolist(), finals.tolist()))
                + f"  -> best {finals[best]:.3e} at lr {float(LRS[best]):g}"
            )
    print(f"initial loss: LoRA {float(loss(ad_lora)):.4f}, LoRA-One {float(loss(ad_one)):.4f}")

    lora, one = results["sgd", "LoRA"], results["sgd", "LoRA-One"]
    assert one[0] <= lora[0] / 10, (one[0], lora[0])
    after = lj.alignment(one[2], target)["w"]
    print(f"LoRA-One (sgd) angles after training (deg): {after}")
    assert after["left"] < 2.0 and after["right"] < 2.0
