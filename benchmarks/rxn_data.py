"""Reaction data for the rxnmap task: chython-rxnmap's atom-to-atom mapping transformer on
reaction SMILES of five textbook reaction classes, built combinatorially from lists of real
reagents (no download), and the mapping chython derives from the model's output.

The model (chython_rxnmap/rxnmap.onnx) reads four int64 tensors that chython builds from a
reaction (``encode_reaction``: atomic number + 2, heavy degree + hydrogens + 2, bond
distance + 2 capped at 10, token roles) and returns a ``[L, L]`` attention matrix; chython
symmetrises its product x reactant blocks, masks pairs of different elements and walks it
greedily (``greedy_mapping``) to one reactant atom per product atom.  The task metric is the
share of product atoms that a quantized model maps to the same reactant atom as float, or to
one that the reactant's symmetry makes equivalent (its automorphism orbit: an ortho carbon
of a phenyl for the other), since the model's scores for two such atoms tie up to noise.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

# Acyl groups R-C(=O)- (the acid is ACYL + "O"), written so that the carbonyl carbon is last.
ACYLS = ("CC(=O)", "CCC(=O)", "CCCC(=O)", "CC(C)C(=O)", "CC(C)(C)C(=O)", "CCCCCC(=O)", "c1ccccc1C(=O)",
         "Clc1ccc(cc1)C(=O)", "COc1ccc(cc1)C(=O)", "O=[N+]([O-])c1ccc(cc1)C(=O)", "c1ccccc1CC(=O)",
         "c1ccccc1/C=C/C(=O)", "c1ccncc1C(=O)", "c1ccoc1C(=O)", "c1ccsc1C(=O)", "C1CCCCC1C(=O)",
         "CC(C)(C)OC(=O)NCC(=O)", "Cc1ccccc1C(=O)", "Fc1ccc(cc1)C(=O)", "CC(=O)Oc1ccccc1C(=O)")
# Alkyl groups of alcohols (the alcohol is "O" + ALKYL), the attached carbon first.
ALKYLS = ("C", "CC", "CCC", "C(C)C", "CCCC", "CC(C)C", "Cc1ccccc1", "C1CCCCC1", "CCOC", "CC=C", "CCc1ccccc1",
          "CC(F)(F)F", "CCCCCCCC", "CC#C")
# Amines, the nitrogen first (the amide is ACYL + AMINE).
AMINES = ("NC", "NCC", "N(C)C", "NCc1ccccc1", "Nc1ccccc1", "N1CCOCC1", "N1CCCCC1", "N1CCCC1", "N1CCN(C)CC1",
          "NC1CCCCC1", "Nc1ccc(F)cc1", "NCC(C)C", "N(CC)CC", "NCCc1ccccc1", "Nc1ccc(OC)cc1", "NC(C)(C)C")
# Aryl groups, the attached atom first with ring closure digit 1 (the bromide is "Br" + ARYL).
ARYLS = ("c1ccccc1", "c1ccc(C)cc1", "c1ccc(OC)cc1", "c1ccc(F)cc1", "c1ccc(C(F)(F)F)cc1", "c1ccc(C#N)cc1",
         "c1cccnc1", "c1ccc(C(C)=O)cc1", "c1cccs1", "c1ccc2ccccc2c1", "c1ccc(Cl)cc1", "c1ccc(N(C)C)cc1")
# Nucleophiles for SN2, the reacting atom last (phenols, alcohols, secondary amines, a thiol).
NUCLEOPHILES = ("c1ccccc1O", "Cc1ccc(cc1)O", "COc1ccc(cc1)O", "CCO", "CC(C)O", "C1COCCN1", "C1CCNCC1",
                "C1CCNC1", "CN(C)", "c1ccccc1S", "CCCCS", "Clc1ccc(cc1)O")
# Alkyl halides, the carbon that is attacked first (the halide is HALOGEN + ALKYL).
HALIDES = (("Br", "Cc1ccccc1"), ("I", "C"), ("Br", "CC"), ("Br", "CC=C"), ("Br", "CCCC"), ("Br", "CC(=O)OCC"),
           ("Cl", "Cc1ccc(Cl)cc1"), ("Br", "CC#C"), ("I", "CC"), ("Br", "CCC(=O)OC"))
# Aldehydes R-CHO for reductive amination (R + "C=O"; the amine's carbon is R + "C").
ALDEHYDE_RESTS = ("c1ccccc1", "COc1ccc(cc1)", "CC(C)", "CCCCC", "c1ccoc1", "Clc1ccc(cc1)", "c1ccncc1",
                  "C1CCCCC1")


def _suzuki_product(aryl: str, other: str) -> str:
    """ARYL with OTHER (its ring digits moved to 2 and 3) on its first atom."""
    other = other.replace("2", "3").replace("1", "2")
    return aryl[:2] + "(" + other + ")" + aryl[2:]


def reactions() -> list[tuple[str, str]]:
    """(class, reaction SMILES) for every combination, in a fixed shuffled order."""
    out = []
    for acyl in ACYLS:
        out += [("esterification", f"{acyl}O.O{alkyl}>>{acyl}O{alkyl}.O") for alkyl in ALKYLS]
        out += [("amide coupling", f"{acyl}O.{amine}>>{acyl}{amine}.O") for amine in AMINES]
    for aryl in ARYLS:
        out += [("Suzuki coupling", f"Br{aryl}.OB(O){other}>>{_suzuki_product(aryl, other)}")
                for other in ARYLS if other != aryl]
    for halogen, alkyl in HALIDES:
        out += [("SN2 substitution", f"{halogen}{alkyl}.{nuc}>>{nuc}{alkyl}.{halogen}") for nuc in NUCLEOPHILES]
    for rest in ALDEHYDE_RESTS:
        out += [("reductive amination", f"{rest}C=O.{amine}>>{rest}C{amine}.O") for amine in AMINES]
    random.Random(0).shuffle(out)
    return out


def rxnmap_model_path() -> Path:
    try:
        from chython_rxnmap import model_path
    except ModuleNotFoundError:
        raise SystemExit("chython-rxnmap is not installed: pip install -e '.[bench]'") from None
    return Path(model_path)


class Encoded:
    """One reaction as the model's feed, and what chython's mapping needs of it."""

    def __init__(self, text: str):
        from chython import smiles
        from chython.reactions.attention._assign import side_adjacency
        from chython.reactions.attention._encode import encode_reaction
        reaction = smiles(text)
        self.smiles = text
        self.encoded = encode_reaction(reaction.reactants, reaction.products)
        self.r_adj, self.p_adj = side_adjacency(reaction.reactants), side_adjacency(reaction.products)
        # Per reactant atom (the order of encode_reaction's tokens): its molecule and symmetry
        # orbit there.  Two atoms of one orbit (the ortho carbons of a phenyl) are the same choice.
        self.orbits = [(i, orbits[n]) for i, molecule in enumerate(reaction.reactants)
                       for orbits in [molecule.automorphism_orbits()] for n in molecule.atom_numbers]

    def feed(self) -> dict[str, np.ndarray]:
        e = self.encoded
        return {name: getattr(e, name)[None].astype(np.int64) for name in ("atoms", "neighbors", "distances", "roles")}

    def mapping(self, attention: np.ndarray) -> np.ndarray:
        """Per product atom the reactant atom chython maps it to (-1: none), from the model's
        output: chython's ``run_model`` post-processing and ``greedy_mapping`` walk."""
        from chython.reactions.attention._assign import greedy_mapping
        e = self.encoded
        scores = (attention[e.p2r] + attention[e.r2p].T) * e.equal_atoms
        return greedy_mapping(scores, self.r_adj, self.p_adj, 1.75)[0]  # 1.75: attention_mapping's default


    def agreeing(self, mapping: np.ndarray, reference) -> int:
        """Product atoms mapped to the reference's reactant atom or one of its symmetry orbit."""
        orbit = lambda j: self.orbits[j] if j >= 0 else None  # noqa: E731
        return sum(orbit(int(a)) == orbit(int(b)) for a, b in zip(mapping, reference))


def check_mapping_matches_chython(text: str = "CC(=O)O.OCC>>CC(=O)OCC.O") -> None:
    """Our feed + post-processing give the map numbers of chython's own attention_mapping."""
    import onnxruntime as ort
    from chython import smiles
    item = Encoded(text)
    session = ort.InferenceSession(str(rxnmap_model_path()), providers=["CPUExecutionProvider"])
    assignment = item.mapping(session.run(None, item.feed())[0])
    reaction = smiles(text)
    reaction.attention_mapping()
    r_numbers = [m.map_number_of(n) for m in reaction.reactants for n in m.atom_numbers]
    p_numbers = [m.map_number_of(n) for m in reaction.products for n in m.atom_numbers]
    ours = [r_numbers[j] if j >= 0 else 0 for j in assignment]
    if ours != p_numbers:
        raise AssertionError(f"mapping differs from chython's attention_mapping on {text}: {ours} vs {p_numbers}")
