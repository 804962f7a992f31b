"""log P(title | catalog) for User-LLM from cached text states: NextItem training that sees every example.

Constrained ranking scores a title by the sum over its tokens of the log-probability renormalized over the
tokens the title trie allows (`fed_userllm.models.constrained.RenormalizeAllowed`). Where the trie has a
single continuation that term is 0, so only the trie's *branching* nodes count, a few percent of its nodes
(docs/design-notes.md has the counts for ml-latest-small).

When the model's only cross-attention block follows the **last** decoder layer and every example has the
same prompt (NextItem without a text history), the frozen LLM's text states at those nodes do not depend
on the user. `CatalogScorer` computes them once (one batched pass of the LLM over the trie's branching
prefixes); log P(title | catalog) for any user then costs one cross-attention
call per branching node on the title's path plus a softmax over the node's allowed tokens, instead of a
pass through the whole LLM. The result is the model's exact score (tested against a full forward pass);
training on it (``objective="catalog"`` in `fed_userllm.train.contextualize`) affords every training example
on a CPU, where the token-level LM loss does not, and optimises what the ranking measures.

With the model's ``encoder_prior``, each branching node's logits are the encoder's conditional log-probability
of the child (its next-item probabilities summed over the titles below that child, divided by the node's) plus
the block's change of the LLM's logit there (with the user minus without). The conditionals telescope along a
title's path to the encoder's probability of that title, so at zero gates the scores are exactly the encoder's.
"""

from __future__ import annotations

import torch
from torch import nn

from fed_userllm.eval.ranking import ranking_sums
from fed_userllm.models.constrained import TitleTrie
from fed_userllm.models.integrations import CrossAttentionIntegration, decoder_layers
from fed_userllm.models.userllm import UserLLM
from fed_userllm.tasks.tasks import FavGenre, NextItem, list_ranks, prompt_cache


def branching_nodes(trie: TitleTrie) -> dict[tuple[int, ...], list[int]]:
    """Token prefixes of the trie with more than one continuation -> their allowed next tokens (sorted)."""
    out, stack = {}, [((), trie.root)]
    while stack:
        prefix, node = stack.pop()
        if len(node) > 1:
            out[prefix] = sorted(node)
        stack.extend((prefix + (t,), child) for t, child in node.items())
    return out


def final_norm(llm: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the LM head (Llama ``norm``, GPT-2 ``ln_f``)."""
    for name in ("norm", "ln_f", "final_layernorm"):
        module = getattr(llm.base_model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(llm).__name__}: cannot find the final norm (expected base_model.norm / ln_f)")


def title_probabilities(item_scores: torch.Tensor, item_titles: torch.Tensor, num_titles: int) -> torch.Tensor:
    """[B, num_titles]: the softmax of ``item_scores`` [B, items] over the items that have a title
    (``item_titles`` >= 0), summed per title (items sharing a title share its probability)."""
    titled = item_titles >= 0
    p = item_scores[:, titled].softmax(-1)
    return p.new_zeros(len(p), num_titles).index_add(1, item_titles[titled], p)


class CatalogScorer:
    """Cached text states of ``model``'s LLM at the branching nodes of ``trie`` after ``prompt``; scores
    titles for users with ``model``'s cross-attention block (differentiable in the block and the encoder)."""

    def __init__(self, model: UserLLM, trie: TitleTrie, prompt: str, tokenizer, batch_size: int = 64,
                 item_titles: torch.Tensor | None = None):
        """``item_titles``: the trie's title index of each of the encoder's item ids (-1: none), which the
        model's ``encoder_prior`` needs (`for_task` gives them)."""
        llm = model.llm
        last = len(decoder_layers(llm)) - 1
        blocks_at = model.integration.at if isinstance(model.integration, CrossAttentionIntegration) else []
        if blocks_at != [last]:
            raise ValueError(f"the catalog objective needs one cross-attention block after the last decoder layer "
                             f"(xattn_layers=[-1]); this model has integration={model.config.integration!r}, "
                             f"blocks after layers {blocks_at}")
        if any(p.requires_grad for p in llm.parameters()):
            raise ValueError(f"strategy={model.config.strategy!r} trains the LLM, whose text states the catalog "
                             "objective caches: use strategy 'enc' or 'proj'")
        self.model, self.norm, self.head = model, final_norm(llm), llm.get_output_embeddings()
        children = branching_nodes(trie)
        prefixes = sorted(children, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(prefixes)}
        self.states = self._states(prompt, tokenizer, prefixes, index, batch_size)

        # the tokens any branching node allows, and each node's allowed tokens as indices into them
        self.tokens = torch.tensor(sorted({t for c in children.values() for t in c}))
        column = {t: j for j, t in enumerate(self.tokens.tolist())}
        width = max(len(c) for c in children.values())
        self.allowed = torch.zeros(len(prefixes), width, dtype=torch.long)
        self.allowed_mask = torch.zeros(len(prefixes), width, dtype=torch.bool)
        for i, p in enumerate(prefixes):
            self.allowed[i, : len(children[p])] = torch.tensor([column[t] for t in children[p]])
            self.allowed_mask[i, : len(children[p])] = True
        self.pair_node, pair_choice = self.allowed_mask.nonzero(as_tuple=True)  # (node, allowed token) pairs
        self.pair_column = self.allowed[self.pair_node, pair_choice]
        self.pair_start = torch.cumsum(self.allowed_mask.sum(1), 0) - self.allowed_mask.sum(1)

        # per item: the branching nodes on its title's path and the position of the chosen token at each
        paths = {seq: [(index[seq[:k]], children[seq[:k]].index(seq[k]))
                       for k in range(len(seq)) if seq[:k] in index] for seq in trie.items}
        depth = max(map(len, paths.values()))
        n_items = 1 + max(i for items in trie.items.values() for i in items)
        self.path_node = torch.zeros(n_items, depth, dtype=torch.long)
        self.path_choice = torch.zeros(n_items, depth, dtype=torch.long)
        self.path_mask = torch.zeros(n_items, depth, dtype=torch.bool)
        self.known = torch.zeros(n_items, dtype=torch.bool)
        for seq, items in trie.items.items():
            nodes, choices = zip(*paths[seq], strict=True) if paths[seq] else ((), ())
            for item in items:
                self.path_node[item, : len(nodes)] = torch.tensor(nodes, dtype=torch.long)
                self.path_choice[item, : len(nodes)] = torch.tensor(choices, dtype=torch.long)
                self.path_mask[item, : len(nodes)] = True
                self.known[item] = True
        # the (node, allowed token) pair chosen at each step of each path; padding -> one past the last pair
        self.path_pair = (self.pair_start[self.path_node] + self.path_choice).masked_fill(~self.path_mask,
                                                                                         len(self.pair_node))

        self.encoder_prior = model.config.encoder_prior
        if self.encoder_prior:
            if item_titles is None:
                raise ValueError("the model's encoder_prior needs item_titles (CatalogScorer.for_task gives them)")
            if int(item_titles.max()) >= n_items:
                raise ValueError(f"item_titles holds title {int(item_titles.max())}; the trie has {n_items}")
            self.item_titles = item_titles.to(self.states.device)
            with torch.no_grad():  # the frozen LLM's logit of every pair without the user (the prior's baseline)
                self.base_logits = self._pair_logits(self.norm(self.states).float())

    @classmethod
    def for_task(cls, model: UserLLM, task: NextItem | FavGenre) -> CatalogScorer:
        """The scorer of ``task``'s answers (titles, genre names) after its prompt (the same for every example
        without a text history)."""
        return cls(model, task.answer_trie, task.prompt(0, 0), task.tokenizer,
                   item_titles=task.item_titles if isinstance(task, NextItem) else None)

    @torch.no_grad()
    def _states(self, prompt: str, tokenizer, prefixes: list[tuple[int, ...]], index: dict, batch_size: int):
        """Output of the last decoder layer at the last token of ``prompt + prefix`` for every prefix.

        A prefix's state is read off any longer prefix (the LLM is causal), so only maximal prefixes are
        run, each as [last prompt token, prefix tokens] on the prompt's KV cache.
        """
        llm = self.model.llm
        prompt_ids = tokenizer(prompt)["input_ids"]
        inner = {p[:k] for p in prefixes for k in range(len(p))}
        runs = [p for p in prefixes if p not in inner]
        captured = {}
        handle = decoder_layers(llm)[-1].register_forward_hook(
            lambda m, a, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
        states = torch.zeros(len(prefixes), llm.config.hidden_size, dtype=next(llm.parameters()).dtype)
        try:
            with self.model.base_llm():
                for lo in range(0, len(runs), batch_size):
                    chunk = runs[lo:lo + batch_size]
                    width = 1 + max(map(len, chunk))
                    ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
                    for r, p in enumerate(chunk):
                        ids[r, : 1 + len(p)] = torch.tensor([prompt_ids[-1], *p])
                    cache = prompt_cache(llm, tokenizer, [prompt], len(chunk))
                    mask = torch.ones(len(chunk), len(prompt_ids) - 1 + width, dtype=torch.long)
                    out = llm(input_ids=ids.to(llm.device), attention_mask=mask.to(llm.device),
                              past_key_values=cache)
                    for r, p in enumerate(chunk):
                        for k in range(len(p) + 1):
                            if p[:k] in index:
                                states[index[p[:k]]] = captured["h"][r, k].cpu()
                    if lo == 0:  # the LM head applied to a cached state must give the LLM's own logits
                        mine = self.head(self.norm(captured["h"][0, 0]))
                        if not torch.allclose(mine.float(), out.logits[0, 0].float(), rtol=1e-3, atol=1e-3):
                            raise ValueError(f"{type(llm).__name__}: logits are not head(norm(last layer)); "
                                             "the catalog objective does not support this architecture")
        finally:
            handle.remove()
        return states.to(llm.device)

    def _head(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """LM-head weight and bias rows of the tokens any branching node allows (float32)."""
        tokens = self.tokens.to(device)
        bias = self.head.bias[tokens] if self.head.bias is not None else torch.zeros(len(tokens), device=device)
        return self.head.weight[tokens].float(), bias.float()

    def _pair_logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM-head logit of every (node, allowed token) pair from normed states h [nodes, hidden] (float32)."""
        weight, bias = self._head(h.device)
        node, column = self.pair_node.to(h.device), self.pair_column.to(h.device)
        return (h[node] * weight[column]).sum(-1) + bias[column]

    def prior(self, batch_user: dict[str, torch.Tensor]) -> torch.Tensor:
        """log P_encoder(allowed token | node) of every pair [B, pairs]: the encoder's next-item probabilities
        summed per title, then per subtree (in float64, so no subtree's mass underflows), differentiable."""
        device = self.states.device
        title_p = title_probabilities(self.model.encoder.score_items(batch_user).double(), self.item_titles,
                                      len(self.known))
        steps = self.path_mask.to(device)
        titles = torch.arange(len(self.known), device=device)[:, None].expand_as(steps)[steps]
        pair_p = title_p.new_zeros(len(title_p), len(self.pair_node)).index_add(1, self.path_pair.to(device)[steps],
                                                                     title_p[:, titles])
        node = self.pair_node.to(device)
        node_p = pair_p.new_zeros(len(pair_p), len(self.states)).index_add(1, node, pair_p)
        tiny = torch.finfo(torch.float64).tiny
        return (pair_p.clamp_min(tiny).log() - node_p[:, node].clamp_min(tiny).log()).float()

    def log_probs(self, batch_user: dict[str, torch.Tensor], items: torch.Tensor) -> torch.Tensor:
        """log P(title of ``items[b]`` | catalog) under the model for user row b: [B], differentiable."""
        prior = self.prior(batch_user) if self.encoder_prior else None
        return self.log_probs_given(*self.model.encode_user(batch_user), items, prior)

    def log_probs_given(self, tokens: torch.Tensor, mask: torch.Tensor, items: torch.Tensor,
                        prior: torch.Tensor | None = None) -> torch.Tensor:
        """log P(title of ``items[b]`` | catalog) given row b's user tokens [B, N, d] and their mask [B, N]
        (and, with the model's ``encoder_prior``, row b's `prior`)."""
        if self.encoder_prior and prior is None:
            raise ValueError("the model's encoder_prior needs prior= (CatalogScorer.prior of the user batch)")
        device = self.states.device
        items = items.to(device)
        if bool((items < 0).any() or (items >= len(self.known)).any()) or not bool(self.known[items].all()):
            raise ValueError(f"items {items.tolist()[:8]}...: expected item ids of the title trie")
        rows, depth = self.path_mask.to(device)[items].nonzero(as_tuple=True)
        node = self.path_node.to(device)[items[rows], depth]
        block = self.model.integration.blocks[0]
        h = block(self.states[node][:, None], tokens[rows], mask[rows])[:, 0]
        h = self.norm(h.to(self.states.dtype)).float()
        weight, bias = self._head(device)
        logits = h @ weight.T + bias
        allowed = logits.gather(1, self.allowed.to(device)[node])
        if prior is not None:  # the LLM's change of each allowed logit, on the encoder's conditional
            pairs = self.pair_start.to(device)[node][:, None] + torch.arange(allowed.shape[1], device=device)
            pairs = pairs.clamp_max(len(self.pair_node) - 1)  # past a node's last pair: masked just below
            allowed = allowed - self.base_logits[pairs] + prior[rows[:, None], pairs]
        allowed = allowed.masked_fill(~self.allowed_mask.to(device)[node], float("-inf")).log_softmax(-1)
        chosen = allowed.gather(1, self.path_choice.to(device)[items[rows], depth][:, None])[:, 0]
        return torch.zeros(len(items), device=device).index_add(0, rows, chosen)

    @torch.no_grad()
    def evaluate(self, task: NextItem | FavGenre, spans, history_len: int, batch_size: int = 32) -> dict[str, float]:
        """Summed Recall@1/5/10, NDCG@10 and ``n`` of ``spans`` by exact ranking over every answer."""
        sums: dict[str, float] = {}
        for lo in range(0, len(spans), batch_size):
            chunk = spans[lo:lo + batch_size]
            user = {k: v.to(self.states.device)
                    for k, v in task.seq.gather(chunk[:, 0], chunk[:, 1], history_len).items()}
            part = ranking_sums(list_ranks(self.rank(user, min(10, len(self.known))), task.answer_ids(chunk)))
            sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
        return sums

    @torch.no_grad()
    def rank(self, batch_user: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        """Top-``k`` item ids per user by exact log P(title | catalog) over every title: what K-beam
        constrained search approximates, at the cost of one cross-attention call per branching node."""
        device = self.states.device
        tokens, mask = self.model.encode_user(batch_user)
        prior = self.prior(batch_user) if self.encoder_prior else None
        node = self.pair_node.to(device)
        n_nodes = len(self.states)
        pair = self.path_pair.to(device)  # padding -> an extra 0 score
        ranked = []
        for b in range(len(tokens)):
            h = self.model.integration.blocks[0](self.states[None], tokens[b:b + 1], mask[b:b + 1])[0]
            logits = self._pair_logits(self.norm(h.to(self.states.dtype)).float())
            if prior is not None:
                logits = logits - self.base_logits + prior[b]
            top = torch.full((n_nodes,), float("-inf"), device=device).scatter_reduce(0, node, logits, "amax")
            norm = top + torch.zeros(n_nodes, device=device).index_add(0, node, (logits - top[node]).exp()).log()
            scores = torch.cat([logits - norm[node], logits.new_zeros(1)])[pair].sum(1)
            scores = scores.masked_fill(~self.known.to(device), float("-inf"))
            ranked.append(scores.topk(k).indices)
        return torch.stack(ranked)
