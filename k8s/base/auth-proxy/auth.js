// segserve auth proxy: the bearer-token check nginx.conf runs (js_set $segserve_auth auth.check)
// on every request that needs a token, REST and gRPC alike (a gRPC client's `authorization`
// metadata is the same HTTP/2 header).
//
// Tokens: the files listed (space-separated) in $segserve_tokens_files. The first is the Secret
// segserve-api-tokens, key `tokens`; the others are tokens of the project's own clients that
// the operator need not copy into it (the web demo's Secret segserve-ui-token, projected next to
// it by k8s/components/ui). A token in any of the files is accepted; a file that is missing is
// skipped (the UI's is absent unless the component is deployed), so only when no file can be
// read, or none holds a token, is everything refused. One token per line; blank lines and
// lines starting with # are ignored; several lines let a rotation overlap (add the new token,
// move the clients, remove the old one). The files are read on every request: njs keeps
// nothing between requests, and kubelet replaces a Secret's files by swapping its ..data
// symlink, so a rotation (or the optional Secret appearing) takes effect with no reload or
// restart. They are a few bytes in the page cache.
//
// Written for njs 0.7 (Debian bookworm) and later (the official nginx image): no for-of or
// spread, which njs 0.7 lacks.

import fs from 'fs';

// check(r) -> "ok", "missing" (no bearer token sent), "invalid" (not one of the tokens) or
// "unconfigured" (no token file readable, or no token in them: everything is refused).
function check(r) {
    const paths = r.variables.segserve_tokens_files.split(' ').filter((p) => p !== '');
    let tokens = [];
    const read = [];
    const unread = [];
    for (let i = 0; i < paths.length; i++) {
        try {
            tokens = tokens.concat(parseTokens(fs.readFileSync(paths[i], 'utf8')));
            read.push(paths[i]);
        } catch (e) {
            unread.push(`${paths[i]} (${e.message})`);
        }
    }
    if (read.length === 0) {
        r.error(`segserve auth: cannot read the token file ${unread.join(', ')}: every `
                + 'request that needs a token is refused; mount the segserve-api-tokens Secret');
        return 'unconfigured';
    }
    if (tokens.length === 0) {
        r.error(`segserve auth: every token file read (${read.join(', ')}) holds no token: `
                + 'every request that needs a token is refused; add one to the '
                + 'segserve-api-tokens Secret');
        return 'unconfigured';
    }
    const sent = bearerToken(r.variables.http_authorization);
    if (sent === null) {
        return 'missing';
    }
    // Every token is compared, each in constant time, so the answer's timing tells nothing
    // about how much of a guess was right (nor in which file it is).
    let found = false;
    for (let i = 0; i < tokens.length; i++) {
        found = sameString(tokens[i], sent) || found;
    }
    if (!found) {
        // Never the token itself: logs are shipped to collectors.
        r.warn(`segserve auth: a bearer token that is not in ${read.join(' nor ')} `
               + `(from ${r.remoteAddress})`);
        return 'invalid';
    }
    return 'ok';
}

function parseTokens(text) {
    return text.split('\n')
        .map((line) => line.trim())
        .filter((line) => line !== '' && !line.startsWith('#'));
}

// The token of "Bearer <token>" (the scheme is case-insensitive, RFC 7235), else null.
function bearerToken(header) {
    const match = /^Bearer +(\S+) *$/i.exec(header || '');
    return match ? match[1] : null;
}

function sameString(a, b) {
    if (a.length !== b.length) {
        return false;
    }
    let diff = 0;
    for (let i = 0; i < a.length; i++) {
        diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
    }
    return diff === 0;
}

export default { check };
