package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"blindperso/hsm"
	"blindperso/pinholder"
)

// Environment variables the token commands read.
const (
	envToken = "BLINDPERSO_TOKEN"  // default for --token
	envSOPIN = "BLINDPERSO_SO_PIN" // the security officer's PIN, if no --so-pin-file
)

// uriHelp is shared by the token commands' help.
var uriHelp = `The token is named by an RFC 7512 PKCS#11 URI (or $BLINDPERSO_TOKEN):

  SoftHSM2:
    pkcs11:token=issuer?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/blindperso/user.pin
  NSS softokn (database made with certutil -N -d sql:DIR --empty-password):
    pkcs11:token=NSS%20Certificate%20DB?module-path=/usr/lib/x86_64-linux-gnu/libsoftokn3.so&x-nss-configdir=/var/lib/blindperso/nssdb

token= is the token label (serial= also works), module-path= the PKCS#11
library. The PIN comes from pin-source=file:PATH (a trailing newline is
ignored) or pin-source=env:VAR; pin-value is refused: a PIN never goes on
a command line. Quote the URI in a shell: it contains '&'.
x-blindperso-table=KEY names the token's mechanism table when the
manufacturer and model it reports do not select one (` + tableKeys + `).
A token whose table says it cannot keep secrets inside it (YubiHSM 2,
Google Cloud KMS) is refused, with the reason.
See docs/HSM.md.`

// tableKeys lists the values x-blindperso-table takes, for the help.
var tableKeys = strings.Join(hsm.TableNames(), ", ")

// tokenFlag adds --token to c and returns a function that opens the token.
func tokenFlag(c *cobra.Command) func(sessions int) (*hsm.Token, error) {
	uri := c.Flags().String("token", "", "PKCS#11 URI of the token (default $"+envToken+")")
	return func(sessions int) (*hsm.Token, error) {
		u := *uri
		if u == "" {
			u = os.Getenv(envToken)
		}
		if u == "" {
			return nil, errors.New("no token: give --token URI or set " + envToken)
		}
		return hsm.OpenURI(u, sessions)
	}
}

func probeCmd() *cobra.Command {
	var asJSON, noAttack bool
	c := &cobra.Command{
		Use:   "probe --token URI [--so-pin-file FILE] [--json]",
		Short: "Say which profiles a token runs in-token, and what a holder of its user PIN can take out",
		Long: `Read the token's mechanism list, try every step the in-token chains need
on throwaway session objects (all destroyed afterwards; the token's keys
are not touched), and print, per profile, "runnable" or "not runnable:
missing CKM_…". A step that works although the mechanism list omits it is
reported "runnable (by trial; not in mechanism list: …)". The probe also
checks the RFC 5649 wrap mechanism of the token's table, the RSA exponent
the token generates, and whether it enforces CKA_WRAP_WITH_TRUSTED.

Then the PIN-holder matrix: throwaway keys are generated exactly as the
key ceremony makes them (issuer keys, KEK, transcript key; destroyed at the
end), a throwaway card is imported under them, and every way out an
attacker with the user PIN and a generic PKCS#11 client knows is tried
(set a usage on a key, copy it with another, unwrap c or a stored blob
into a readable key, derive or digest into one, wrap under a key of one's
own, make one's own trusted key, log in as SO with the user PIN, …). Each
path is "closed" with the token's refusal or OPEN with what came out.
On a token that enforces CKA_WRAP_WITH_TRUSTED (SoftHSM2) the throwaway
KEK must be marked trusted by the security officer, as in the ceremony:
give --so-pin-file (or $BLINDPERSO_SO_PIN), else the KEK paths are not
tried. --no-attack skips the matrix (it writes throwaway token objects).

` + uriHelp,
		Example: `  issuer probe --token 'pkcs11:token=issuer?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/blindperso/user.pin' --so-pin-file so.pin
  issuer probe --token "$BLINDPERSO_TOKEN" --json | jq '.profiles[] | select(.runnable) | .profile'
  issuer probe --json --so-pin-file so.pin | jq '.pin_holder.results[] | select(.open) | .id'`,
		Args: cobra.NoArgs,
	}
	open := tokenFlag(c)
	readSOPIN := soPINFlag(c, "file holding the security officer's PIN, to make a trusted throwaway KEK for the PIN-holder matrix")
	c.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON, for scripts")
	c.Flags().BoolVar(&noAttack, "no-attack", false, "only the profile matrix: do not run the PIN-holder adversary")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		soPIN, err := readSOPIN()
		if err != nil {
			return err
		}
		tok, err := open(1)
		if err != nil {
			return err
		}
		defer tok.Close()
		ctx := cmd.Context()
		r, err := tok.Probe(ctx)
		if err != nil {
			return err
		}
		var ph *pinholder.Report
		var phErr string // the adversary could not run: said, not fatal
		if !noAttack {
			uri := c.Flags().Lookup("token").Value.String()
			if uri == "" {
				uri = os.Getenv(envToken)
			}
			if ph, err = probeWithPINHolder(ctx, tok, uri, soPIN); err != nil {
				if ctx.Err() != nil {
					return err
				}
				phErr = err.Error()
			}
		}
		pub := publishedTable(tok.Mechanisms())
		if asJSON {
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(struct {
				*hsm.ProbeReport
				Published *tablePublished   `json:"table_published,omitempty"`
				PINHolder *pinholder.Report `json:"pin_holder,omitempty"`
				// PINHolderError says why the adversary did not run.
				PINHolderError string `json:"pin_holder_error,omitempty"`
			}{r, pub, ph, phErr})
		}
		if err := r.WriteText(cmd.OutOrStdout()); err != nil {
			return err
		}
		if pub != nil {
			fmt.Fprintf(cmd.OutOrStdout(), "\nnote: table %q is published, not measured (%s).\n"+
				"      The trials above are its first measurement: record them in docs/HSM.md and correct hsm/vendors.go.\n",
				pub.Table, pub.Source)
		}
		if phErr != "" {
			fmt.Fprintf(cmd.OutOrStdout(), "\nPIN-holder adversary: not run: %s\n"+
				"      (it attacks keys made as the ceremony makes them; a token that cannot make them runs no profile either)\n", phErr)
		}
		if ph == nil {
			return nil
		}
		fmt.Fprintln(cmd.OutOrStdout())
		return ph.WriteText(cmd.OutOrStdout())
	}
	return c
}

func keygenCmd() *cobra.Command {
	var kind, label, out string
	c := &cobra.Command{
		Use:   "keygen --token URI --kind rsa2048|rsa3072|p256 --label L --out PUB.pem",
		Short: "Generate the issuer key pair in the token and export its public key",
		Long: `Generate the issuer key pair inside the token, as token objects labelled L
(the private key: sensitive, never extractable, unwrap only for RSA,
derive only for EC), write the public key to PUB.pem (PEM
SubjectPublicKeyInfo) and print its SHA-256 fingerprint on stdout: the
value perso stations check (perso run --expect-fingerprint) and cards may
pin. RSA keys get e = 3 where the token generates it (SoftHSM2; the
paper's choice), else 65537 (NSS softokn). Run 'issuer probe' first: rsa*
keys serve the rsa-* profiles, p256 keys the ecdh-p256-* profiles.

` + uriHelp,
		Example: `  export BLINDPERSO_TOKEN='pkcs11:token=issuer?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/blindperso/user.pin'
  issuer keygen --kind rsa2048 --label issuer-2026 --out issuer.pub.pem`,
		Args: cobra.NoArgs,
	}
	open := tokenFlag(c)
	c.Flags().StringVar(&kind, "kind", "", "key kind: rsa2048, rsa3072 or p256")
	c.Flags().StringVar(&label, "label", "", "CKA_LABEL of the new key pair (unique in the token)")
	c.Flags().StringVar(&out, "out", "", "file to write the public key to (PEM); must not exist")
	for _, f := range []string{"kind", "label", "out"} {
		c.MarkFlagRequired(f)
	}
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		// Refuse an existing file before a key is made for nothing.
		f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return fmt.Errorf("public key file: %w", err)
		}
		tok, err := open(1)
		if err != nil {
			f.Close()
			os.Remove(out)
			return err
		}
		defer tok.Close()
		key, err := tok.GenerateIssuerKey(cmd.Context(), kind, label)
		if err != nil {
			f.Close()
			os.Remove(out)
			return err
		}
		if _, err := f.Write(key.PublicKeyPEM()); err != nil {
			f.Close()
			return fmt.Errorf("%s: %w (the key %q is in the token: export it with issuer pubkey)", out, err, label)
		}
		if err := f.Close(); err != nil {
			return err
		}
		fmt.Fprintf(cmd.ErrOrStderr(), "generated %s issuer key %q in token %q; public key in %s\n", key.Kind, label, tok.Info().Label, out)
		fmt.Fprintf(cmd.OutOrStdout(), "%x\n", key.Fingerprint())
		return nil
	}
	return c
}

func pubkeyCmd() *cobra.Command {
	var label, out string
	c := &cobra.Command{
		Use:   "pubkey --token URI --label L [--out PUB.pem]",
		Short: "Export the public key of an issuer key pair already in the token",
		Long: `Find the issuer key pair labelled L in the token and write its public key
(PEM SubjectPublicKeyInfo) to PUB.pem, or to stdout without --out. The
fingerprint goes to stderr.

` + uriHelp,
		Example: `  issuer pubkey --token "$BLINDPERSO_TOKEN" --label issuer-2026 --out issuer.pub.pem`,
		Args:    cobra.NoArgs,
	}
	open := tokenFlag(c)
	c.Flags().StringVar(&label, "label", "", "CKA_LABEL of the key pair")
	c.Flags().StringVar(&out, "out", "", "file to write the public key to (PEM)")
	c.MarkFlagRequired("label")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		tok, err := open(1)
		if err != nil {
			return err
		}
		defer tok.Close()
		key, err := tok.FindIssuerKey(cmd.Context(), label)
		if err != nil {
			return err
		}
		fmt.Fprintf(cmd.ErrOrStderr(), "%s issuer key %q, fingerprint %x\n", key.Kind, label, key.Fingerprint())
		if out == "" {
			_, err = cmd.OutOrStdout().Write(key.PublicKeyPEM())
			return err
		}
		return os.WriteFile(out, key.PublicKeyPEM(), 0o644)
	}
	return c
}

// tablePublished is what `issuer probe --json` says about a table written
// from a vendor's published documentation rather than measured.
type tablePublished struct {
	Table  string             `json:"table"`
	Source string             `json:"source"`
	Claims []hsm.ProfileClaim `json:"claims,omitempty"`
}

func publishedTable(m *hsm.Mechanisms) *tablePublished {
	if !m.Published {
		return nil
	}
	return &tablePublished{Table: m.Name, Source: m.Source, Claims: m.Claims}
}
