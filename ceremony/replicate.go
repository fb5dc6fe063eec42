package ceremony

import (
	"context"
	"encoding/hex"
	"fmt"
	"strings"

	"blindperso/hsm"
	"blindperso/protocol"
)

// The replication of a ceremony's keys to the other members of the
// issuer's group (token.members, replicate; docs/OPERATIONS.md,
// "Replicating keys to another member").

// preflightMembers opens every member and checks, before anything is
// created, everything the replication needs: each member enforces
// CKA_WRAP_WITH_TRUSTED, runs the profiles of the issuer keys, has its
// SO PIN source, holds none of the labels to be copied, and neither it
// nor the source holds a trusted key that could carry a replicable key
// out; the keys of replicate are in the source, replicable.
func (r *runner) preflightMembers(ctx context.Context, byName map[string]hsm.ProfileResult) error {
	s := r.s
	if s.anyReplicable() {
		fs, err := r.tok.UnsafeTrustedWrappers(ctx)
		if err != nil {
			return err
		}
		if len(fs) > 0 {
			return fmt.Errorf("token %q: %s (replicable keys would leave under it; nothing was created)", r.tok.Info().Label, fs[0])
		}
	}
	r.profiles = map[string]protocol.Profile{}
	for _, k := range s.IssuerKeys {
		if p, ok := byName[k.Profiles[0]]; ok && p.Runnable {
			prof, err := protocol.ProfileByName(k.Profiles[0])
			if err == nil {
				r.profiles[k.Label] = prof
			}
		}
	}
	if rp := s.Replicate; rp != nil {
		for i, l := range rp.IssuerKeys {
			k, err := r.tok.FindIssuerKey(ctx, l)
			if err != nil {
				return fmt.Errorf("replicate.issuer-keys[%d]: %w (nothing was created)", i, err)
			}
			if !k.Replicable {
				return fmt.Errorf("replicate.issuer-keys[%d]: issuer key %q in token %q is not replicable (CKA_EXTRACTABLE false: it can never leave its token; a key is made replicable when it is generated, replicable: true; nothing was created)", i, l, r.tok.Info().Label)
			}
			r.repKeys = append(r.repKeys, k)
			r.logf("replicate: issuer key %q found, replicable", l)
		}
		if rp.KEK != "" {
			k, err := r.tok.FindKEK(ctx, rp.KEK)
			if err != nil {
				return fmt.Errorf("replicate.kek: %w (nothing was created)", err)
			}
			if !k.Replicable || !k.Trusted {
				return fmt.Errorf("replicate.kek: KEK %q in token %q is not a replicable trusted KEK (replicable %v, trusted %v; a KEK is made replicable when it is generated; nothing was created)", rp.KEK, r.tok.Info().Label, k.Replicable, k.Trusted)
			}
			r.repKEK = k
			r.logf("replicate: KEK %q found, replicable and trusted", rp.KEK)
		}
		if fs, err := r.tok.Audit(ctx, r.repKeys, r.repKEK, nil); err != nil {
			return err
		} else if len(fs) > 0 {
			return fmt.Errorf("replicate: %s (a replica gets the key policy's attributes, so a key that differs from it cannot be copied; nothing was created)", fs[0])
		}
	}
	src := r.tok.Info()
	for i, m := range s.Token.Members {
		where := fmt.Sprintf("token.members[%d]", i)
		tok, err := hsm.OpenURI(m.URI, 1)
		if err != nil {
			return fmt.Errorf("%s: %w", where, err)
		}
		mb := &member{spec: m, tok: tok}
		r.members = append(r.members, mb)
		info := tok.Info()
		mb.rec = TokenRec{URI: m.URI, Label: info.Label, Manufacturer: info.Manufacturer, Model: info.Model, Serial: info.Serial,
			Module: info.Module, Table: tok.Mechanisms().Name, SOPINSource: m.SOPIN.describe()}
		for j, o := range append([]*member{{tok: r.tok}}, r.members[:i]...) {
			oi := o.tok.Info()
			if oi.Module == info.Module && oi.Serial == info.Serial && oi.Label == info.Label {
				other := "token.uri"
				if j > 0 {
					other = fmt.Sprintf("token.members[%d]", j-1)
				}
				return fmt.Errorf("%s is the same token as %s (%q, serial %s)", where, other, info.Label, info.Serial)
			}
		}
		r.logf("member %q (%s %s, serial %s), table %s", info.Label, info.Manufacturer, info.Model, info.Serial, tok.Mechanisms().Name)
		if err := tok.ReplicationRefusal(); err != nil {
			return fmt.Errorf("%s: %w (nothing was created)", where, err)
		}
		rep, err := tok.Probe(ctx)
		if err != nil {
			return fmt.Errorf("%s: %w", where, err)
		}
		for _, p := range rep.Profiles {
			for _, k := range s.IssuerKeys {
				for _, name := range k.Profiles {
					if p.Profile == name && !p.Runnable {
						return fmt.Errorf("%s: issuer key %q: member %q cannot run profile %s in-token: missing %s (every member serves the key's profiles; nothing was created)",
							where, k.Label, info.Label, name, strings.Join(p.Missing, ", "))
					}
				}
			}
		}
		if mb.soPIN, err = m.SOPIN.read(); err != nil {
			return fmt.Errorf("%s: %w", where, err)
		}
		if rot := s.KEKRotation; rot != nil {
			if _, err := tok.FindKEK(ctx, rot.From); err != nil {
				return fmt.Errorf("%s: member %q does not hold kek-rotation.from: %w (a group moves to the new KEK together: every member holds the KEK the card keys are under now; nothing was created)", where, info.Label, err)
			}
		}
		for _, l := range r.replicatedLabels() {
			used, err := tok.LabelInUse(ctx, l)
			if err != nil {
				return err
			}
			if used {
				return fmt.Errorf("%s: label %q already exists in member %q: a replica takes the source's label (nothing was created)", where, l, info.Label)
			}
		}
		fs, err := tok.UnsafeTrustedWrappers(ctx)
		if err != nil {
			return err
		}
		if len(fs) > 0 {
			return fmt.Errorf("%s: member %q: %s (the replicas would leave under it; nothing was created)", where, info.Label, fs[0])
		}
		r.body.Members = append(r.body.Members, mb.rec)
		r.step("preflight-member", map[string]any{"member": i, "uri": m.URI, "so_pin_source": m.SOPIN.describe()},
			map[string]any{"label": info.Label, "serial": info.Serial, "table": tok.Mechanisms().Name,
				"wrap_with_trusted": rep.WrapWithTrustedDetail, "labels_free": r.replicatedLabels(), "source": map[string]any{"label": src.Label, "serial": src.Serial}})
	}
	return nil
}

// replicatedLabels are the labels copied to every member.
func (r *runner) replicatedLabels() []string {
	if len(r.s.Token.Members) == 0 {
		return nil
	}
	var l []string
	for _, k := range r.s.IssuerKeys {
		l = append(l, k.Label)
	}
	if r.s.KEK != nil {
		l = append(l, r.s.KEK.Label)
	}
	if rot := r.s.KEKRotation; rot != nil {
		l = append(l, rot.To)
	}
	if rp := r.s.Replicate; rp != nil {
		l = append(l, rp.IssuerKeys...)
		if rp.KEK != "" {
			l = append(l, rp.KEK)
		}
	}
	return l
}

// replicate copies the keys to every member and records each copy.
func (r *runner) replicate(ctx context.Context, soPIN string) error {
	keys := append(append([]*hsm.IssuerKeyRef{}, r.madeKeys...), r.repKeys...)
	kek := r.madeKEK
	if kek == nil {
		kek = r.repKEK
	}
	src := r.tok.Info()
	for i, m := range r.members {
		res, err := hsm.Replicate(ctx, hsm.Replication{Source: r.tok, Target: m.tok, SourceSOPIN: soPIN, TargetSOPIN: m.soPIN,
			Keys: keys, KEK: kek, Profiles: r.profiles})
		if err != nil {
			return fmt.Errorf("token.members[%d]: %w", i, err)
		}
		var objs, proofs []map[string]any
		for _, o := range res.Objects {
			hist := map[string]any{}
			for n, v := range o.History {
				hist[n] = map[string]any{"source": v[0], "replica": v[1]}
			}
			attrs := map[string]any{}
			for n, v := range o.Attributes {
				attrs[n] = v
			}
			objs = append(objs, map[string]any{"label": o.Label, "what": o.What, "attributes": attrs, "history": hist})
		}
		for _, p := range res.Proofs {
			proofs = append(proofs, map[string]any{"what": p.What, "method": p.Method, "source": p.Source, "target": p.Target, "equal": p.Equal})
		}
		var labels []string
		for _, k := range keys {
			labels = append(labels, k.Label)
		}
		if kek != nil {
			labels = append(labels, kek.Label)
		}
		r.step("replicate",
			map[string]any{"source": map[string]any{"label": src.Label, "serial": src.Serial},
				"target":  map[string]any{"member": i, "uri": m.spec.URI, "label": m.rec.Label, "serial": m.rec.Serial},
				"objects": labels, "so_pin_sources": map[string]any{"source": r.s.Token.SOPIN.describe(), "target": m.spec.SOPIN.describe()}},
			map[string]any{
				"replication_import_key": map[string]any{"kind": hsm.ReplicationImportKind, "fingerprint": hex.EncodeToString(res.ImportKeyFingerprint[:]),
					"made_by": "the target's user, as session objects (CKA_TOKEN false); its private half unwraps only a transport key (hsm.TransportUnwrapTemplate)"},
				"transport": "an AES-256 key the source's SO made trusted (a session object), wrapped with RSA-OAEP (SHA-1) to the replication-import key the source's SO imported trusted; " +
					"each object wrapped under it with RFC 5649; on the target the KEK unwrapped by its SO, trusted, and copied into a private read-only token object; every transport object destroyed",
				"objects": objs, "proofs": proofs,
			})
		r.logf("replicated %s to member %q (serial %s): replication-import key sha256 %x; %d objects, attributes equal; %d proofs equal",
			strings.Join(labels, ", "), m.rec.Label, m.rec.Serial, res.ImportKeyFingerprint, len(res.Objects), len(res.Proofs))
	}
	return nil
}

// planReplication is plan's part for the replication.
func (r *runner) planReplication(say func(string, ...any)) {
	labels := r.replicatedLabels()
	for i, m := range r.members {
		say("replicate %s to member %d %q (serial %s) inside the tokens: a replication-import key made there, a transport key the security officers (%s, %s) make trusted, every attribute compared, equality proved in the tokens, the transport destroyed",
			strings.Join(labels, ", "), i, m.rec.Label, m.rec.Serial, r.s.Token.SOPIN.describe(), m.spec.SOPIN.describe())
	}
}
