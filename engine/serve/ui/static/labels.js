// Labels and the keyboard, on every page. Writes go through postLabels only:
// a POST carrying the page's token (engine/serve/security.py refuses any other).
(function () {
  const meta = (name) => (document.querySelector(`meta[name="${name}"]`) || {}).content;
  const token = meta('reelsift-token');
  const readOnly = meta('reelsift-read-only') === 'true';

  async function postLabels(clipIds, label, extra) {
    const body = Object.assign({clip_ids: clipIds, label: label}, extra || {});
    const resp = await fetch('/api/labels', {
      method: 'POST', headers: {'Content-Type': 'application/json', 'X-Reelsift-Token': token},
      body: JSON.stringify(body)});
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error || resp.statusText);
    return data;
  }
  window.reelsift = {postLabels: postLabels, readOnly: readOnly};

  function say(text, bad) {
    let bar = document.getElementById('label-status');
    if (!bar) {
      bar = document.createElement('div');
      bar.id = 'label-status';
      bar.setAttribute('role', 'status');
      document.body.appendChild(bar);
    }
    bar.textContent = text;
    bar.className = bad ? 'bad' : '';
  }
  window.reelsift.say = say;

  function mark(card, label) {
    card.classList.remove('labelled-accept', 'labelled-reject');
    const state = card.querySelector('.label-state');
    if (label === 'accept' || label === 'reject') {
      card.classList.add('labelled-' + label);
      if (state) { state.textContent = label + 'ed'; state.className = 'tag label-state ' + label; }
    } else if (state) { state.textContent = ''; state.className = 'tag label-state'; }
  }

  async function label(cards, kind, extra) {
    if (readOnly || !cards.length) return;
    try {
      const done = await postLabels(cards.map((c) => c.dataset.clipId), kind, extra);
      if (kind !== 'tag' && kind !== 'untag') cards.forEach((c) => mark(c, kind));
      say(`${kind}: ${done.written} clip${done.written === 1 ? '' : 's'}`);
    } catch (err) { say(`label not saved: ${err.message}`, true); }
  }
  window.reelsift.labelCards = label;

  document.addEventListener('click', (ev) => {
    const button = ev.target.closest('.label-buttons button[data-label]');
    if (!button) return;
    const card = button.closest('[data-clip-id]');
    if (card) label([card], button.dataset.label);
  });

  // The gallery's keyboard: j/k move, a/r accept/reject, space plays, / searches.
  const cards = () => [...document.querySelectorAll('#gallery .card, #similar .card')];
  let current = -1;
  function focus(i) {
    const all = cards();
    if (!all.length) return;
    current = Math.max(0, Math.min(all.length - 1, i));
    all.forEach((c, j) => c.classList.toggle('focused', j === current));
    all[current].scrollIntoView({block: 'nearest'});
    all[current].focus({preventScroll: true});
  }
  function play(card) {
    const thumb = card.querySelector('a.thumb');
    let video = card.querySelector('video');
    if (video) { video.paused ? video.play() : video.pause(); return; }
    video = document.createElement('video');
    video.src = `/media/${card.dataset.clipId}/clip.mp4`;
    video.muted = true; video.loop = true; video.autoplay = true; video.playsInline = true;
    thumb.replaceChildren(video);
  }
  document.addEventListener('keydown', (ev) => {
    const typing = ev.target.closest && ev.target.closest('input, textarea, select');
    if (typing || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const all = cards();
    const card = current >= 0 ? all[current] : null;
    if (ev.key === '/') {
      const box = document.getElementById('q');
      if (box) { ev.preventDefault(); box.focus(); }
    } else if (ev.key === 'j') { focus(current + 1); }
    else if (ev.key === 'k') { focus(current - 1); }
    else if ((ev.key === 'a' || ev.key === 'r') && card) {
      label([card], ev.key === 'a' ? 'accept' : 'reject');
      focus(current + 1);
    } else if (ev.key === ' ' && card) { ev.preventDefault(); play(card); }
    else if (ev.key === 'Enter' && card) { window.location = `/clip/${card.dataset.clipId}`; }
  });

  // Label every card on the page at once (a map selection opens as such a page).
  document.addEventListener('DOMContentLoaded', () => {
    const bulk = document.getElementById('bulk-label');
    if (!bulk) return;
    bulk.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const kind = ev.submitter ? ev.submitter.value : 'accept';
      const tag = bulk.querySelector('[name=tag]').value.trim() || undefined;
      const note = bulk.querySelector('[name=note]').value.trim() || undefined;
      const shown = cards().filter((c) => c.closest('#gallery'));
      if (!bulk.dataset.poly) { label(shown, kind, {tag: tag, note: note}); return; }
      // A map selection: every clip it holds, not only this page's.
      const q = new URLSearchParams({method: bulk.dataset.method, poly: bulk.dataset.poly});
      fetch('/api/map/select?' + q).then((r) => r.json()).then(async (sel) => {
        try {
          const done = await postLabels(sel.clip_ids, kind, {tag: tag, note: note});
          if (kind !== 'tag') shown.forEach((c) => mark(c, kind));
          say(`${kind}: ${done.written} clips`);
        } catch (err) { say(`label not saved: ${err.message}`, true); }
      });
    });
  });
})();
